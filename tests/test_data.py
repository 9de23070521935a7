"""The demo dataset: scikit-learn's digits, split by original, enlarged deterministically."""

import pytest
import torch

pytest.importorskip("sklearn", reason="the demo dataset needs scikit-learn (pip install scikit-learn)")

from smartfrz_fast import data  # noqa: E402
from smartfrz_fast.data import distort, load_digits_dataset, load_digits_originals, split_indices  # noqa: E402


def test_originals_match_scikit_learn():
    from sklearn.datasets import load_digits

    x, y = load_digits_originals()
    bunch = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x, torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0)
    assert torch.equal(y, torch.as_tensor(bunch.target, dtype=torch.int64))


def test_originals_without_the_bundled_file_go_through_scikit_learn(monkeypatch):
    fast = load_digits_originals()
    monkeypatch.setattr(data, "_ORIGINALS", None)
    monkeypatch.setattr(data, "_bundled_digits_file", lambda: None)
    slow = load_digits_originals()
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def test_missing_scikit_learn_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(data, "_ORIGINALS", None)
    monkeypatch.setattr(data, "_bundled_digits_file", lambda: None)
    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits_dataset(num_samples=100)


@pytest.mark.parametrize("image_size", [8, 12, 16])
def test_shapes_dtypes_and_value_range(image_size):
    train, test = load_digits_dataset(num_samples=600, seed=3, image_size=image_size)
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    assert x_train.shape == (600, 1, image_size, image_size)
    assert x_test.shape[1:] == (1, image_size, image_size)
    assert x_test.shape[0] == y_test.shape[0] >= 1
    assert x_train.dtype == x_test.dtype == torch.float32
    assert y_train.dtype == y_test.dtype == torch.int64
    for x in (x_train, x_test):
        assert torch.isfinite(x).all()
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert x.max() > 0.9  # strokes survive the distortions
        assert 0.05 < x.mean() < 0.6  # mostly background, not blank
    for y in (y_train, y_test):
        assert y.min() >= 0 and y.max() <= 9


def test_every_image_has_ink():
    x, _, xt, _ = load_digits_dataset(num_samples=2000, seed=0, return_tensors=True)
    assert (x.flatten(1).sum(1) > 1.0).all()
    assert (xt.flatten(1).sum(1) > 1.0).all()


def test_same_seed_same_tensors_different_seed_different_tensors():
    a = load_digits_dataset(num_samples=500, seed=7, image_size=16, return_tensors=True)
    b = load_digits_dataset(num_samples=500, seed=7, image_size=16, return_tensors=True)
    c = load_digits_dataset(num_samples=500, seed=8, image_size=16, return_tensors=True)
    for t, u in zip(a, b):
        assert torch.equal(t, u)
    assert not torch.equal(a[0], c[0])


def test_distort_is_deterministic_and_independent_of_batching():
    x, _ = load_digits_originals()
    x = x[:300]
    a = distort(x, 16, torch.Generator().manual_seed(1))
    b = distort(x, 16, torch.Generator().manual_seed(1), batch_size=64)
    assert torch.equal(a, b)
    # strength 0 is a plain enlargement: no randomness shows
    c = distort(x, 16, torch.Generator().manual_seed(1), strength=0.0)
    d = distort(x, 16, torch.Generator().manual_seed(2), strength=0.0)
    assert torch.equal(c, d)
    assert not torch.equal(a, c)


def test_train_and_test_originals_are_disjoint_and_cover_everything():
    train_idx, test_idx = split_indices(seed=0)
    assert set(train_idx.tolist()).isdisjoint(test_idx.tolist())
    assert len(train_idx) + len(test_idx) == 1797
    assert 0.2 < len(test_idx) / 1797 < 0.3
    # a different seed holds out different originals
    other_train, other_test = split_indices(seed=1)
    assert set(other_test.tolist()) != set(test_idx.tolist())


def test_test_images_come_only_from_held_out_originals():
    """The undistorted first pass of the test set is exactly the held-out originals, enlarged."""
    originals, labels = load_digits_originals()
    _, test_idx = split_indices(seed=0)
    _, _, x_test, y_test = load_digits_dataset(num_samples=400, seed=0, image_size=8, return_tensors=True)
    n = len(test_idx)
    clean = x_test[:n]
    # at image_size 8 the clean pass is the originals themselves (up to interpolation rounding)
    held_out = originals[test_idx].flatten(1)
    train_idx, _ = split_indices(seed=0)
    seen = originals[train_idx].flatten(1)
    d_held = torch.cdist(clean.flatten(1), held_out).min(1).values
    assert d_held.max() < 1e-4
    assert torch.equal(torch.sort(y_test[:n]).values, torch.sort(labels[test_idx]).values)
    # no clean test image equals a training original (duplicates among the raw digits aside)
    d_seen = torch.cdist(clean.flatten(1), seen).min(1).values
    assert (d_seen > 1e-4).float().mean() > 0.99


def test_labels_are_balanced():
    _, y, _, yt = load_digits_dataset(num_samples=5000, seed=0, return_tensors=True)
    for labels in (y, yt):
        counts = torch.bincount(labels, minlength=10).float()
        assert counts.min() > 0
        assert counts.max() / counts.min() < 1.25


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        load_digits_dataset(num_samples=0)
    with pytest.raises(ValueError, match="image_size"):
        load_digits_dataset(num_samples=10, image_size=4)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_dataset(num_samples=10, test_fraction=1.0)
