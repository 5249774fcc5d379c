"""A tiny checkpoint of this framework and tiny images, for the inference and visualization tool tests."""
import PIL.Image
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cli import compose_config
from deformable_detr.data.synthetic_shapes import SHAPE_CATEGORIES

CATEGORIES = [{"id": i, "name": name} for i, name in SHAPE_CATEGORIES]
NUM_CLASSES = max(c["id"] for c in CATEGORIES) + 1


def make_checkpoint(path, categories=CATEGORIES):
    """A randomly initialized tiny_test model saved as training saves it (config, num_classes), with ``categories``."""
    torch.manual_seed(0)
    cfg = compose_config("train", ["experiment=tiny_test", "model.backbone.pretrained=false", "dataset.root=/nonexistent"])
    model = instantiate(cfg.model, num_classes=NUM_CLASSES)
    checkpoint = {"model": model.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True), "num_classes": NUM_CLASSES}
    if categories is not None:
        checkpoint["categories"] = categories
    torch.save(checkpoint, path)
    return path


def make_image(path, width, height, seed=0, exif_orientation=None):
    """A random-noise RGB image; with ``exif_orientation`` (e.g. 6: rotate 90 degrees clockwise to view) as a JPEG tag."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator).numpy()
    image = PIL.Image.fromarray(pixels, "RGB")
    if exif_orientation is None:
        image.save(path)
    else:
        exif = PIL.Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(path, exif=exif)
    return path
