"""Stand-in: nothing of torchvision.models is used."""
