"""Empty: transformers imports `torchvision.io` but the reference paths used in the tests never call it."""
