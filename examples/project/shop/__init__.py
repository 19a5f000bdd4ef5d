"""An example shop whose orders arrive on Pub/Sub and are handled by consumerd tasks."""
