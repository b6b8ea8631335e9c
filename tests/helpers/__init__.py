"""What several test folders share: real photos on disk (photos.py) and images made to reveal
what a pipeline did to them (images.py)."""
