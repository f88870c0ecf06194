"""The toy world: generated images of coloured shapes with true captions and known corruptions."""
