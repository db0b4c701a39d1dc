import gzip
import io
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data.distributed import DistributedSampler

from flexsurgeon.data import load_data
from flexsurgeon.data.loaders import make_loader
from flexsurgeon.data.synthetic import parse_synthetic
from flexsurgeon.errors import DataError, FlexSurgeonError

CFG = dict(input_size=(3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
           interpolation="bilinear", crop_pct=1.0, crop_mode="center")
RAW = dict(CFG, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # tensors hold pixel values in [0, 1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------------- synthetic

def _stack(dataset):
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.tensor(ys)


def test_synthetic_is_deterministic_per_seed():
    a = load_data("synthetic:classes=4,train=16,val=8", data_config=CFG)
    b = load_data("synthetic:classes=4,train=16,val=8", data_config=CFG)
    other = load_data("synthetic:classes=4,train=16,val=8,seed=1", data_config=CFG)
    assert torch.equal(_stack(a.val)[0], _stack(b.val)[0])
    torch.manual_seed(3)
    train_a = _stack(a.train)[0]
    torch.manual_seed(3)
    assert torch.equal(train_a, _stack(b.train)[0])
    assert not torch.allclose(_stack(a.val)[0], _stack(other.val)[0])
    assert not torch.allclose(a.train[0][0], a.val[0][0])  # splits are generated apart


def test_synthetic_train_flip_follows_hflip():
    flipping = load_data("synthetic:train=4", data_config=CFG)
    still = load_data("synthetic:train=4", data_config=CFG, train_transform_kwargs={"hflip": 0.0})
    draws = []
    for seed in range(8):
        torch.manual_seed(seed)
        draws.append((flipping.train[0][0], still.train[0][0]))
    assert any(torch.equal(a.flip(-1), draws[0][0]) for a, _ in draws[1:])
    assert all(torch.equal(b, draws[0][1]) for _, b in draws)


def test_synthetic_sizes_classes_and_channels():
    bundle = load_data("synthetic:classes=4,train=24,val=12,size=20", data_config=CFG, in_chans=1)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (24, 12, 4)
    assert bundle.class_names == ["0", "1", "2", "3"] and "24 train / 12 val" in bundle.description
    x, y = bundle.train[5]
    assert x.shape == (1, 20, 20) and x.dtype == torch.float32 and y == 1
    assert sorted(_stack(bundle.val)[1].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert load_data("synthetic:", data_config=CFG, in_chans=4).val[0][0].shape == (4, 32, 32)
    defaults = load_data("synthetic:", data_config=CFG)
    assert (len(defaults.train), len(defaults.val), defaults.num_classes) == (2000, 500, 10)


def test_synthetic_is_normalised_with_the_data_config():
    raw = _stack(load_data("synthetic:val=40", data_config=RAW).val)[0]
    normed = _stack(load_data("synthetic:val=40", data_config=CFG).val)[0]
    mean, std = torch.tensor(CFG["mean"]).view(1, 3, 1, 1), torch.tensor(CFG["std"]).view(1, 3, 1, 1)
    assert raw.min() >= 0 and raw.max() <= 1
    torch.testing.assert_close(normed, (raw - mean) / std)


def _nearest_class_mean(train_x, train_y, val_x, val_y):
    means = torch.stack([train_x[train_y == c].mean(0) for c in range(int(train_y.max()) + 1)])
    return (torch.cdist(val_x, means).argmin(1) == val_y).float().mean().item()


def test_synthetic_classes_are_separable_by_texture_not_by_mean_colour():
    bundle = load_data("synthetic:classes=4,train=160,val=80", data_config=CFG)
    torch.manual_seed(0)
    (tx, ty), (vx, vy) = _stack(bundle.train), _stack(bundle.val)
    spectrum = _nearest_class_mean(torch.fft.fft2(tx).abs().flatten(1), ty, torch.fft.fft2(vx).abs().flatten(1), vy)
    colour = _nearest_class_mean(tx.mean((2, 3)), ty, vx.mean((2, 3)), vy)
    assert spectrum > 0.7, spectrum  # chance is 0.25
    assert colour < 0.45, colour


@pytest.mark.parametrize("spec, words", [
    ("synthetic:clases=4", ["'clases'", "classes, train, val, seed"]),
    ("synthetic:train=many", ["train", "'many'", "integer"]),
    ("synthetic:classes=1", ["classes=1", "at least 2"]),
    ("synthetic:classes=500", ["at most 60"]),
    ("synthetic:noise=lots", ["noise", "'lots'", "a number"]),
    ("synthetic:noise=2", ["noise=2", "between 0 and 1"]),
])
def test_synthetic_spec_errors(spec, words):
    with pytest.raises(DataError) as e:
        load_data(spec, data_config=CFG)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert isinstance(e.value, FlexSurgeonError)


def test_parse_synthetic_fills_defaults():
    assert parse_synthetic("synthetic:") == {"classes": 10, "train": 2000, "val": 500, "seed": 0, "size": None,
                                             "noise": 0.3}
    assert parse_synthetic("synthetic:classes=4, train=256,val=64,size=32,seed=7,noise=0.05") == \
        {"classes": 4, "train": 256, "val": 64, "seed": 7, "size": 32, "noise": 0.05}


def test_synthetic_noise_is_the_pixel_noise_and_leaves_the_pattern_alone():
    raw = {n: _stack(load_data(f"synthetic:val=8,noise={n}", data_config=RAW).val)[0] for n in (0, 0.05, 0.3)}
    assert raw[0].shape == raw[0.3].shape
    # the same sample's pattern, with the noise scaled (up to clamping at 0 and 1)
    inside = (raw[0.3] > 0.01) & (raw[0.3] < 0.99)
    assert torch.allclose((raw[0.05] - raw[0])[inside], (raw[0.3] - raw[0])[inside] / 6, atol=1e-5)


# ------------------------------------------------------------------------------------------- IDX

def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + \
        array.astype(np.uint8).tobytes()


def _write_idx(folder: Path, prefix: str, images, labels, gz: bool):
    folder.mkdir(parents=True, exist_ok=True)
    for kind, dims, array in (("images", 3, images), ("labels", 1, labels)):
        path = folder / f"{prefix}-{kind}-idx{dims}-ubyte{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(_idx(array)) if gz else _idx(array))


def _tiny_idx(n=12, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = np.repeat((labels * 100 + 20)[:, None, None], 8, axis=1).repeat(8, axis=2)  # constant per class
    return images.astype(np.uint8) + rng.integers(0, 2, images.shape, dtype=np.uint8), labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_loads_and_expands_gray(tmp_path, gz):
    images, labels = _tiny_idx()
    _write_idx(tmp_path, "train", images, labels, gz)
    _write_idx(tmp_path, "t10k", images[:6], labels[:6], gz)
    bundle = load_data(str(tmp_path), data_config=RAW)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (12, 6, 3)
    assert bundle.class_names == ["0", "1", "2"] and "t10k" in bundle.description
    x, y = bundle.val[2]
    assert x.shape == (3, 32, 32) and y == 2
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert abs(x.mean().item() - 220 / 255) < 0.01
    assert load_data(str(tmp_path), data_config=RAW, in_chans=1).train[0][0].shape == (1, 32, 32)


def test_idx_val_is_carved_from_train_without_t10k_or_when_asked(tmp_path):
    images, labels = _tiny_idx(n=30)
    _write_idx(tmp_path, "train", images, labels, gz=True)
    bundle = load_data(str(tmp_path), data_config=RAW, val_split=0.2, seed=1)
    assert (len(bundle.train), len(bundle.val)) == (24, 6) and bundle.val_carved
    assert sorted(int(bundle.val[i][1]) for i in range(6)) == [0, 0, 1, 1, 2, 2]
    _write_idx(tmp_path, "t10k", images[:9], labels[:9], gz=True)
    own = load_data(str(tmp_path), data_config=RAW)
    assert len(own.val) == 9 and not own.val_carved  # the val options then have nothing to act on
    carved = load_data(str(tmp_path), data_config=RAW, val_split=0.2, val_from_train=True)
    assert len(carved.val) == 6 and carved.val_carved


@pytest.mark.parametrize("damage, words", [
    (lambda b: b"\x08\x03" + b[2:], "magic"),
    (lambda b: b[:-5], "truncated"),
    (lambda b: b"", "magic"),
])
def test_corrupt_idx_is_a_data_error(tmp_path, damage, words):
    images, labels = _tiny_idx()
    _write_idx(tmp_path, "train", images, labels, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=words) as e:
        load_data(str(tmp_path), data_config=RAW)
    assert str(path) in str(e.value)


def test_idx_label_count_mismatch(tmp_path):
    images, labels = _tiny_idx()
    _write_idx(tmp_path, "train", images, labels[:-1], gz=False)
    with pytest.raises(DataError, match="12 images but .* 11 labels"):
        load_data(str(tmp_path), data_config=RAW)


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_package():
    bundle = load_data(str(FASHION), data_config=CFG)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (60000, 10000, 10)
    x, y = bundle.train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10


# ------------------------------------------------------------------------------------------- image folders

def _png(path: Path, value=(10, 200, 30), mode="RGB", size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def _folder(root: Path, classes=("cat", "dog"), n=5, ext=".png"):
    for c, name in enumerate(classes):
        for i in range(n):
            _png(root / name / f"{i}{ext}", value=(40 * c + i, 100, 200))
    return root


def test_train_val_folders(tmp_path):
    _folder(tmp_path / "train", n=4)
    _folder(tmp_path / "val", n=2, ext=".jpg")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    bundle = load_data(str(tmp_path), data_config=CFG)
    assert (len(bundle.train), len(bundle.val), bundle.class_names) == (8, 4, ["cat", "dog"])
    assert "8 train / 4 val images, 2 classes" in bundle.description
    x, y = bundle.val[3]
    assert x.shape == (3, 32, 32) and y == 1
    assert bundle.train[0][0].shape == (3, 32, 32)


def test_class_folders_split_stratified_and_seeded(tmp_path):
    _folder(tmp_path, classes=("a", "b", "c"), n=10)
    bundle = load_data(str(tmp_path), data_config=CFG, val_split=0.2, seed=0)
    again = load_data(str(tmp_path), data_config=CFG, val_split=0.2, seed=0)
    other = load_data(str(tmp_path), data_config=CFG, val_split=0.2, seed=1)
    assert (len(bundle.train), len(bundle.val)) == (24, 6)
    assert sorted(label for _, label in bundle.val.samples) == [0, 0, 1, 1, 2, 2]
    assert not set(bundle.train.samples) & set(bundle.val.samples)
    assert bundle.val.samples == again.val.samples and bundle.val.samples != other.val.samples


@pytest.mark.parametrize("make, words", [
    (lambda r: (_folder(r / "train", ("a", "b", "c")), _folder(r / "val", ("a", "b", "d"))),
     ["only in train: c", "only in val: d", "{r}/train"]),
    (lambda r: r.mkdir(exist_ok=True), ["{r}", "empty"]),
    (lambda r: (_folder(r, ("a",)), (r / "b").mkdir()), ["{r}/b", "no images"]),
    (lambda r: _folder(r / "train"), ["{r}", "no val/"]),
    (lambda r: _png(r / "loose.png"), ["{r}", "no class folders"]),
    (lambda r: _folder(r, ("only",)), ["{r}", "at least two"]),
])
def test_folder_layout_errors_name_the_folder(tmp_path, make, words):
    root = tmp_path / "data"
    root.mkdir()
    make(root)
    with pytest.raises(DataError) as e:
        load_data(str(root), data_config=CFG)
    message = str(e.value)
    assert "\n" not in message
    assert all(w.format(r=root) in message for w in words), message


def test_missing_path_and_file_errors(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/nope: no such file or folder.*synthetic:"):
        load_data(str(tmp_path / "nope"), data_config=CFG)
    _png(tmp_path / "x.png")
    with pytest.raises(DataError, match="is a file"):
        load_data(str(tmp_path / "x.png"), data_config=CFG)
    with pytest.raises(DataError, match="split"):
        load_data(str(_folder(tmp_path / "flat")), data_config=CFG, val_split=0)


def _truncated_jpeg(path: Path):
    """A JPEG whose header opens but whose data ends half way: it fails only when decoded."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])


def _items(dataset, train=False):
    """Every ``(red value 0..255, label)`` an unaugmented (val) dataset yields through a loader
    (RAW config); in order unless ``train``."""
    loader = make_loader(dataset, batch_size=4, train=train, seed=0)
    return [(round(float(x[0, 0, 0]) * 255), int(label)) for xs, ys in loader for x, label in zip(xs, ys)]


def _names(*datasets):
    """Sorted ``(class folder/file name, label)`` of every sample."""
    return sorted((f"{Path(p).parent.name}/{Path(p).name}", label) for d in datasets for p, label in d.samples)


def test_unreadable_images_are_left_out_at_scan_time_named_and_counted(tmp_path, caplog):
    _folder(tmp_path / "train", n=3)
    _folder(tmp_path / "val", n=2)
    (tmp_path / "train" / "cat" / "random.jpg").write_bytes(random.Random(0).randbytes(2000))
    (tmp_path / "train" / "dog" / "empty.png").write_bytes(b"")
    (tmp_path / "val" / "dog" / "0b.png").write_bytes(b"this is not a png at all")
    bundle = load_data(str(tmp_path), data_config=RAW)
    assert (len(bundle.train), len(bundle.val)) == (6, 4) and bundle.skipped == 3
    assert "6 train / 4 val images, 2 classes" in bundle.description
    assert "3 unreadable images left out" in bundle.description
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "left out 3 unreadable images" in warnings[0], warnings
    assert all(name in warnings[0] for name in ("cat/random.jpg", "dog/empty.png", "dog/0b.png"))
    assert _names(bundle.train) == [(f"{c}/{i}.png", label) for label, c in enumerate(("cat", "dog")) for i in range(3)]
    assert _items(bundle.val) == [(0, 0), (1, 0), (40, 1), (41, 1)]
    assert bundle.skipped == 3  # reading the rest adds nothing


def test_a_class_folder_of_only_unreadable_images_is_one_error_line(tmp_path):
    _folder(tmp_path, n=3)
    (tmp_path / "bird").mkdir()
    (tmp_path / "bird" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError) as info:
        load_data(str(tmp_path), data_config=RAW)
    assert str(info.value).startswith(f"no readable images under {tmp_path / 'bird'}: its 1 image fails to open")
    assert "\n" not in str(info.value)


def test_an_image_that_fails_to_decode_is_dropped_from_its_batch_never_replaced(tmp_path, caplog):
    _folder(tmp_path / "train", n=1)
    _folder(tmp_path / "val", n=3)
    _truncated_jpeg(tmp_path / "val" / "cat" / "1b.jpg")  # sorts between cat's images 1 and 2
    bundle = load_data(str(tmp_path), data_config=RAW)
    assert len(bundle.val) == 7 and bundle.skipped == 0  # its header is fine
    for _ in range(2):  # a bad file is counted once, however often it is asked for
        assert _items(bundle.val) == [(0, 0), (1, 0), (2, 0), (40, 1), (41, 1), (42, 1)]  # no stand-in for 1b.jpg
    assert bundle.skipped == 1 and caplog.text.count("1b.jpg") == 1
    loader = make_loader(bundle.val, batch_size=7, train=False, seed=0)
    assert [len(y) for _, y in loader] == [6]  # the batch is smaller, not refilled


def test_a_training_batch_that_loses_images_stays_even_and_never_below_two(tmp_path):
    _folder(tmp_path / "train", n=1)
    _folder(tmp_path / "val", n=3)
    for name in ("cat", "dog"):
        _truncated_jpeg(tmp_path / "val" / name / "bad.jpg")
    bundle = load_data(str(tmp_path), data_config=RAW)
    seen = set()
    for seed in range(8):  # shuffled batches of 4 out of 8 images, 2 of them bad
        sizes = tuple(sorted(len(y) for _, y in make_loader(bundle.val, batch_size=4, train=True, seed=seed)))
        assert sizes in ((2, 2), (2, 4)), sizes  # 3 left are cut to 2: timm's mixup needs an even batch
        seen.add(sizes)
    assert seen == {(2, 2), (2, 4)} and bundle.skipped == 2
    assert len(list(make_loader(bundle.val, batch_size=1, train=False, seed=0))) == 6  # empty batches left out


def test_skip_count_crosses_worker_processes(tmp_path):
    _folder(tmp_path / "train", n=3)
    _folder(tmp_path / "val", n=1)
    _truncated_jpeg(tmp_path / "train" / "dog" / "broken.jpg")
    bundle = load_data(str(tmp_path), data_config=CFG)
    loader = make_loader(bundle.train, batch_size=3, train=True, seed=0, num_workers=1)
    worker_batches = [(x, y) for x, y in loader]
    assert bundle.skipped == 1
    in_process = list(make_loader(bundle.train, batch_size=3, train=True, seed=0, num_workers=0))
    for (a, ya), (b, yb) in zip(worker_batches, in_process, strict=True):  # the same batches either way
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_a_symlink_loop_reads_each_image_once_under_its_own_class(tmp_path, caplog):
    root = _folder(tmp_path / "data", classes=("a", "b"), n=6)
    (root / "a" / "loop").symlink_to("..", target_is_directory=True)
    (root / "b" / "self").symlink_to(".", target_is_directory=True)
    bundle = load_data(str(root), data_config=RAW, val_split=0.5)
    assert (len(bundle.train), len(bundle.val)) == (6, 6)
    assert _names(bundle.train, bundle.val) == [(f"{c}/{i}.png", label) for label, c in enumerate("ab")
                                                for i in range(6)]
    items = _items(bundle.val)  # a's images are red 0..5, b's 40..45
    assert len(items) == 6 and all((red < 40) == (label == 0) for red, label in items), items
    assert "skipped 2 symlinked folders that loop back into the data folder" in caplog.text
    assert "a/loop" in caplog.text and "b/self" in caplog.text


def test_symlinks_to_folders_outside_the_data_folder_are_read(tmp_path, caplog):
    outside = _folder(tmp_path / "elsewhere", classes=("cats", "more_dogs"), n=3)
    root = tmp_path / "data"
    _folder(root, classes=("dog",), n=3)
    (root / "cat").symlink_to(outside / "cats", target_is_directory=True)  # a whole class folder
    (root / "dog" / "more").symlink_to(outside / "more_dogs", target_is_directory=True)  # part of one
    (root / "dog" / "more_again").symlink_to(outside / "more_dogs", target_is_directory=True)  # read once
    (outside / "cats" / "up").symlink_to("..", target_is_directory=True)  # a loop outside
    bundle = load_data(str(root), data_config=RAW, val_split=0.5)
    assert bundle.class_names == ["cat", "dog"] and (len(bundle.train), len(bundle.val)) == (4, 5)
    assert _names(bundle.train, bundle.val) == [*((f"cat/{i}.png", 0) for i in range(3)),
                                                *((f"dog/{i}.png", 1) for i in range(3)),
                                                *((f"more/{i}.png", 1) for i in range(3))]
    assert "skipped 2 symlinked folders" in caplog.text and "cat/up" in caplog.text
    assert "dog/more_again" in caplog.text


def test_a_class_folder_linked_back_into_the_data_folder_is_one_error_line(tmp_path):
    root = _folder(tmp_path / "data", classes=("a", "b"), n=3)
    (root / "c").symlink_to("a", target_is_directory=True)
    with pytest.raises(DataError, match=f"class folder {root / 'c'} is a symlink to {root / 'a'}"):
        load_data(str(root), data_config=RAW)


def test_gray_rgba_and_16bit_images_convert(tmp_path):
    root = tmp_path / "data"
    _png(root / "val" / "gray" / "g.png", value=128, mode="L")
    _png(root / "val" / "rgba" / "clear.png", value=(0, 0, 0, 0), mode="RGBA")
    (root / "val" / "deep").mkdir()
    Image.fromarray(np.full((10, 12), 13107, dtype=np.uint16)).save(root / "val" / "deep" / "d.png")  # 0.2 of 65535
    assert Image.open(root / "val" / "deep" / "d.png").mode.startswith("I")
    for name in ("gray", "rgba", "deep"):
        _png(root / "train" / name / "t.png")
    bundle = load_data(str(root), data_config=RAW)
    images = {bundle.class_names[y]: x for x, y in (bundle.val[i] for i in range(len(bundle.val)))}
    assert bundle.skipped == 0 and all(x.shape == (3, 32, 32) for x in images.values())
    torch.testing.assert_close(images["gray"], torch.full((3, 32, 32), 128 / 255))
    torch.testing.assert_close(images["rgba"], torch.ones(3, 32, 32))  # transparent -> white background
    torch.testing.assert_close(images["deep"], torch.full((3, 32, 32), 51 / 255))  # scaled, not clipped to 1.0
    one = load_data(str(root), data_config=RAW, in_chans=1)
    assert one.val[2][0].shape == (1, 32, 32) and one.train[0][0].shape == (1, 32, 32)
    torch.testing.assert_close(one.val[0][0], torch.full((1, 32, 32), 51 / 255))


# ------------------------------------------------------------------------------------------- loaders

def _order(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_make_loader_is_deterministic_per_seed_and_epoch(tmp_path):
    _folder(tmp_path, classes=("a", "b"), n=8)
    bundle = load_data(str(tmp_path), data_config=CFG, val_split=0.25)
    args = dict(batch_size=4, train=True, seed=5)
    torch.manual_seed(0)
    first = _order(make_loader(bundle.train, epoch=2, **args))
    state = torch.get_rng_state()
    torch.manual_seed(123)  # the caller's RNG state must not matter...
    random.seed(9)
    second = _order(make_loader(bundle.train, epoch=2, **args))
    torch.manual_seed(0)
    _order(make_loader(bundle.train, epoch=2, **args))
    assert torch.equal(state, torch.get_rng_state())  # ...and is left as it was
    assert len(first) == 3  # 12 images, drop_last for training
    for (a, ya), (b, yb) in zip(first, second, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    third = _order(make_loader(bundle.train, epoch=3, **args))
    indices = [[i for i, _ in make_loader(bundle.train, epoch=e, **args).sampler] for e in (2, 2, 3)]
    assert indices[0] == indices[1] != indices[2] and sorted(indices[2]) == list(range(12))
    assert any(not torch.equal(a, b) for (a, _), (b, _) in zip(first, third))
    loader = make_loader(bundle.train, epoch=0, **args)
    loader.sampler.set_epoch(2)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, _order(loader)))


def test_make_loader_val_is_sequential_and_keeps_the_last_batch():
    bundle = load_data("synthetic:classes=3,train=10,val=7", data_config=CFG)
    labels = torch.cat([y for _, y in make_loader(bundle.val, batch_size=3, train=False, seed=0)])
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert len(make_loader(bundle.train, batch_size=64, train=True, seed=0)) == 1  # never drops every batch


def test_make_loader_distributed_shards_the_data():
    bundle = load_data("synthetic:classes=3,train=12,val=6", data_config=CFG)
    seen = []
    for rank in range(2):
        loader = make_loader(bundle.train, batch_size=2, train=True, seed=0, epoch=1, distributed=True,
                             num_replicas=2, rank=rank)
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.epoch == 1
        seen.append([int(i) for i, _ in loader.sampler])
    assert len(seen[0]) == len(seen[1]) == 6 and sorted(seen[0] + seen[1]) == list(range(12))


def test_make_loader_distributed_evaluation_counts_every_sample_once():
    # 7 samples on 3 ranks: DistributedSampler would pad to 9 and score two samples twice.
    bundle = load_data("synthetic:classes=3,train=12,val=7", data_config=CFG)
    shards = []
    for rank in range(3):
        loader = make_loader(bundle.val, batch_size=2, train=False, seed=0, distributed=True, num_replicas=3,
                             rank=rank)
        labels = torch.cat([y for _, y in loader])
        shards.append([int(i) for i, _ in loader.sampler])
        assert len(labels) == len(loader.sampler) == len(shards[-1])
    assert [len(s) for s in shards] == [3, 2, 2]
    assert sorted(shards[0] + shards[1] + shards[2]) == list(range(7))


# ------------------------------------------------------------------------------------------- timm passthrough

def test_timm_passthrough_torchvision_name(tmp_path):
    images, labels = _tiny_idx(n=10)
    raw = tmp_path / "FashionMNIST" / "raw"
    _write_idx(raw, "train", images, labels, gz=False)
    _write_idx(raw, "t10k", images[:4], labels[:4], gz=False)
    bundle = load_data(f"torch/fashion_mnist:{tmp_path}", data_config=CFG)
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (10, 4, 10)
    x, y = bundle.train[1]
    assert x.shape == (3, 32, 32) and y == 1


@pytest.mark.parametrize("spec", ["torch/no_such_set", "hfds/someone/no-such-set"])
def test_timm_passthrough_failure_is_a_data_error(tmp_path, spec):
    with pytest.raises(DataError) as e:
        load_data(f"{spec}:{tmp_path}", data_config=CFG)
    message = str(e.value)  # no network, or (hfds/ without the datasets package) the package to install
    assert spec in message and ("synthetic:" in message or "pip install" in message) and "\n" not in message


def test_a_missing_backend_package_is_one_line_naming_it(capsys):
    """timm prints its own install advice before it raises: the user sees one line, ours."""
    import flexsurgeon.data.timm_sets as timm_sets

    def create_dataset(*args, **kwargs):
        print("Please install Hugging Face datasets package `pip install datasets`.")
        raise ModuleNotFoundError("No module named 'datasets'", name="datasets")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timm_sets, "create_dataset", create_dataset)
        with pytest.raises(DataError) as e:
            load_data("hfds/someone/pets", data_config=CFG)
    assert str(e.value) == ("--data hfds/someone/pets: timm needs the Python package 'datasets' for hfds/ data sets: "
                            "pip install datasets")
    assert capsys.readouterr().out == ""


def test_empty_spec():
    with pytest.raises(DataError, match="empty"):
        load_data("  ", data_config=CFG)


def test_val_from_train_leaves_the_val_folder_unseen(tmp_path):
    _folder(tmp_path / "train", n=10)
    _folder(tmp_path / "val", n=3, ext=".jpg")
    bundle = load_data(str(tmp_path), data_config=CFG, val_split=0.2, seed=0, val_from_train=True)
    assert (len(bundle.train), len(bundle.val)) == (16, 4) and bundle.val_carved
    assert not load_data(str(tmp_path), data_config=CFG).val_carved  # train/ and val/ as they are
    paths = [Path(p) for p, _ in bundle.train.samples + bundle.val.samples]
    assert all(p.parent.parent == tmp_path / "train" for p in paths) and len(set(paths)) == 20


def test_train_subset_is_seeded_and_keeps_val():
    from flexsurgeon.data.bundle import subset_train

    bundle = load_data("synthetic:classes=4,train=64,val=16", data_config=RAW)
    a, b, c = (subset_train(bundle, 20, seed) for seed in (0, 0, 1))
    assert len(a.train) == 20 and a.val is bundle.val and "subset of 20" in a.description
    assert a.train.indices == b.train.indices != c.train.indices
    assert len(set(a.train.indices)) == 20
    with pytest.raises(DataError, match="subset of 65 images is impossible"):
        subset_train(bundle, 65, 0)


def test_recipe_crop_scale_reaches_timms_random_resized_crop(tmp_path):
    from flexsurgeon.training.recipe import Recipe
    from flexsurgeon.training.run_data import train_transform_kwargs

    kwargs = train_transform_kwargs(Recipe(scale=[0.35, 1.0], hflip=0.0))
    assert kwargs == {"hflip": 0.0, "scale": (0.35, 1.0)}
    root = _folder(tmp_path)
    bundle = load_data(str(root), data_config=CFG, train_transform_kwargs=kwargs)
    crops = [t for t in bundle.train.transform.transform.transforms if "RandomResizedCrop" in type(t).__name__]
    assert len(crops) == 1 and tuple(crops[0].scale) == (0.35, 1.0)
