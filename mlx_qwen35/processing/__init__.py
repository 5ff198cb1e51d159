"""From images, video and text to model inputs: placeholders, grids and 3-D position ids."""
