"""`make audit`: each image's predicted probabilities, ranked by cleanlab into suspects a person reviews."""
