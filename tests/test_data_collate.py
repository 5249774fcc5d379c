import pytest
import torch

from deformable_detr.data.collate import collate, pad_images


def _item(height, width, value, image_id):
    return torch.full((3, height, width), float(value)), {"image_id": torch.tensor(image_id)}


def test_pads_bottom_right_to_batch_maximum():
    images, masks, targets = collate([_item(4, 5, 1.0, 1), _item(6, 3, 2.0, 2)])
    assert images.shape == (2, 3, 6, 5)
    assert masks.shape == (2, 6, 5) and masks.dtype == torch.bool
    assert torch.all(images[0, :, :4, :5] == 1) and torch.all(images[0, :, 4:, :] == 0)
    assert torch.all(images[1, :, :6, :3] == 2) and torch.all(images[1, :, :, 3:] == 0)
    assert not masks[0, :4, :5].any() and masks[0, 4:, :].all()
    assert not masks[1, :, :3].any() and masks[1, :, 3:].all()
    assert [int(t["image_id"]) for t in targets] == [1, 2]


def test_no_rounding_of_sizes():
    images, masks = pad_images([torch.ones(3, 7, 9), torch.ones(3, 5, 11)])
    assert images.shape == (2, 3, 7, 11) and masks.shape == (2, 7, 11)
    assert int((~masks).sum()) == 7 * 9 + 5 * 11


def test_none_items_are_dropped():
    images, masks, targets = collate([None, _item(2, 2, 1.0, 5), None])
    assert images.shape == (1, 3, 2, 2)
    assert not masks.any()
    assert [int(t["image_id"]) for t in targets] == [5]


def test_batch_of_only_none_is_empty():
    images, masks, targets = collate([None, None])
    assert images.shape[0] == 0 and masks.shape[0] == 0 and targets == []


def test_pad_to_a_multiple():
    images, masks = pad_images([torch.ones(3, 7, 9), torch.ones(3, 5, 33)], multiple=8)
    assert images.shape == (2, 3, 8, 40) and masks.shape == (2, 8, 40)
    # only the images' own pixels are unmasked; the extra rows and columns are zero and masked
    assert int((~masks).sum()) == 7 * 9 + 5 * 33
    assert not masks[0, :7, :9].any() and masks[0, 7:].all() and masks[0, :, 9:].all()
    assert float(images.sum()) == 3 * (7 * 9 + 5 * 33)
    # sizes already on the multiple stay; 0 and 1 do not round
    assert pad_images([torch.ones(3, 16, 24)], multiple=8)[0].shape == (1, 3, 16, 24)
    for multiple in (0, 1):
        assert pad_images([torch.ones(3, 7, 9)], multiple=multiple)[0].shape == (1, 3, 7, 9)
    with pytest.raises(ValueError, match="multiple"):
        pad_images([torch.ones(3, 7, 9)], multiple=-1)


def test_collate_pads_to_a_multiple():
    images, masks, targets = collate([_item(4, 5, 1.0, 1), _item(6, 3, 2.0, 2)], pad_multiple=4)
    assert images.shape == (2, 3, 8, 8)
    assert not masks[0, :4, :5].any() and int((~masks[0]).sum()) == 20
    assert [int(t["image_id"]) for t in targets] == [1, 2]
