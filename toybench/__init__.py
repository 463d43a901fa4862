"""ToyBench: a small trained text-to-image world where forgetting is measurable.

world.py draws the images, oracle.py says which concepts an image shows, model.py builds
the host's own SD1.5-layout UNet, SD1 CLIP and KL VAE at toy size, loader.py loads the
shipped weights (toybench/weights/), train.py rebuilds them.
"""
