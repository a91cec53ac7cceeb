"""One module per architecture: blocks -> decoder -> model class."""
