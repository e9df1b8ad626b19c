"""The unit of work: config, data, model and the training loop, with no Ray in it."""

import os

# albumentations asks the network for a newer version on every import, and offline that
# prints a warning in every process; the user's own setting wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
