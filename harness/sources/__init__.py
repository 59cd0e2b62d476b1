"""Where models and data come from: model sources, sample sources, the builtin digits."""
