# Empty dependencies file for main.
# This may be replaced when dependencies are built.
