"""The one transcription of the official DINO code (facebookresearch/dino), what the tests and
benchmarks compare dino_fast with: ``vision_transformer`` (ViT, DINOHead, MultiCropWrapper and
their initialization), ``loss`` (DINOLoss) and ``training`` (train_dino's construction, the
schedules, one iteration of train_one_epoch). It imports only torch, torchvision (the convnet
branch), numpy and its own modules, never the rest of dino_fast, so that a comparison with it
tests something."""
