import numpy as np
import pytest
from sklearn.cluster import KMeans

from geovq.errors import GeovqError
from geovq.latents import LatentSet
from geovq.quantize import QUANTIZERS, Quantizer, make_quantizer


def blobs(n_per: int, centers: np.ndarray, scale: float, seed: int) -> LatentSet:
    rng = np.random.default_rng(seed)
    pts = np.concatenate([c + scale * rng.normal(size=(n_per, centers.shape[1])) for c in centers])
    rng.shuffle(pts)
    grid = pts.reshape(-1, 1, 1, centers.shape[1])
    return LatentSet.from_grids(grid, np.zeros_like(grid))


def test_kmeans_recovers_separated_centres_and_encodes_nearest():
    centers = np.array([[0, 0], [0, 10], [10, 0], [10, 10]], float)  # sorted as below: by x, then y
    train = blobs(200, centers, 0.5, seed=0)
    q = make_quantizer("kmeans", 4, seed=0).fit(train)
    found = q.codebook_[np.argsort(q.codebook_[:, 0] * 100 + q.codebook_[:, 1])]
    np.testing.assert_allclose(found, centers, atol=0.15)
    assert q.fit_info_["converged"]
    test = blobs(50, centers, 0.5, seed=1)
    codes = q.encode(test)
    brute = ((test.token_mu[:, None, :] - q.codebook_[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(codes.reshape(-1), brute)
    np.testing.assert_allclose(q.decode(codes).reshape(-1, 2), q.codebook_[brute])


def test_kmeans_objective_matches_an_independent_run():
    rng = np.random.default_rng(3)
    grid = rng.normal(size=(500, 2, 2, 3))
    train = LatentSet.from_grids(grid, np.zeros_like(grid))
    q = make_quantizer("kmeans", 16, seed=0).fit(train)
    # Lloyd from k-means++ lands in a local optimum; ours must be as good as sklearn's best of 5 restarts
    # within a few percent, and its inertia must be the true sum of squared distances of its codebook.
    best = KMeans(16, n_init=5, random_state=0).fit(train.token_mu).inertia_
    d2 = ((train.token_mu[:, None] - q.codebook_[None]) ** 2).sum(-1).min(1).sum()
    assert q.fit_info_["inertia"] == pytest.approx(d2, rel=1e-3)
    assert d2 <= best * 1.05


def test_quantizer_save_load_round_trip(tmp_path):
    train = blobs(100, np.eye(3) * 5, 0.3, 0)
    q = make_quantizer("kmeans", 3, seed=1).fit(train)
    q.save(tmp_path / "q.npz")
    back = Quantizer.load(tmp_path / "q.npz")
    assert type(back) is type(q) and back.layout_ == q.layout_
    np.testing.assert_array_equal(back.encode(train), q.encode(train))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(GeovqError, match="not a readable geovq quantizer file .*delete it") as refused:
        Quantizer.load(tmp_path / "bad.npz")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "objects.npz").write_bytes((tmp_path / "objects.npy").read_bytes())  # a pickled array
    with pytest.raises(GeovqError, match="not a readable geovq quantizer") as refused_pickle:
        Quantizer.load(tmp_path / "objects.npz")
    for error in (refused, refused_pickle):  # never a hint to load untrusted data unsafely
        assert "allow_pickle" not in str(error.value) and "pickle" not in str(error.value)
    np.savez(tmp_path / "foreign.npz", codebook=np.zeros((3, 2)), header=np.array('{"format": "other"}'))
    with pytest.raises(GeovqError, match="not a geovq quantizer file"):
        Quantizer.load(tmp_path / "foreign.npz")


def test_hyperparameters_come_from_the_constructor_signature():
    from geovq.quantize.gq import GaussianQuant
    from geovq.quantize.kmeans import KMeansQuantizer

    hps = KMeansQuantizer.hyperparameters()
    assert list(hps) == ["max_iter", "tol", "seed_sample"]
    assert (hps["tol"].type, hps["tol"].default) == (float, 1e-4)
    assert hps["max_iter"].help == "Lloyd sweeps at most"  # the constructor's own comment
    q = KMeansQuantizer(16, seed=2, tol=0.5)
    assert q.get_params() == {"n_codes": 16, "seed": 2, "max_iter": 300, "tol": 0.5, "seed_sample": 200_000}
    assert list(GaussianQuant.hyperparameters()) == ["beta"]
    with pytest.raises(GeovqError, match="kmeans max_iter='many' must be int"):
        KMeansQuantizer(16, max_iter="many").validate()
    with pytest.raises(GeovqError, match="max_iter >= 1"):
        KMeansQuantizer(16, max_iter=0).validate()
    with pytest.raises(GeovqError, match="seed_sample=8 draws fewer tokens than K=16"):
        KMeansQuantizer(16, seed_sample=8).fit(blobs(50, np.eye(2), 0.1, 0))


@pytest.mark.parametrize("name", ["W2", "w2 fast", "-w2", "w2.fast", ""])
def test_register_refuses_names_that_are_not_slugs(name):
    from geovq.quantize import register

    with pytest.raises(GeovqError, match="is not valid"):
        register(name)


def test_registry_and_bad_inputs():
    assert "kmeans" in QUANTIZERS
    with pytest.raises(GeovqError, match="unknown quantizer 'nope'; valid: .*kmeans"):
        make_quantizer("nope", 4)
    with pytest.raises(GeovqError, match="K=1"):
        make_quantizer("kmeans", 1)
    train = blobs(2, np.eye(2), 0.1, 0)
    with pytest.raises(GeovqError, match="K=8 exceeds the 4 training tokens"):
        make_quantizer("kmeans", 8).fit(train)
    with pytest.raises(GeovqError, match="not fitted"):
        make_quantizer("kmeans", 2).encode(train)
