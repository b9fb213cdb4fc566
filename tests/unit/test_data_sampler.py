"""Sampler contract: global shuffle keyed by seed, DP split, exact resume, buckets (on the mock source)."""

import numpy as np
import pytest
import torch

from megatron_sd3.data import GlobalBatchPlan, MockDataset, build_data_iterator


def _small(n=48, buckets=((4, 4),), mask=False, seed=7):
    return MockDataset(n, list(buckets), in_channels=4, text_len=5, text_dim=8, pooled_dim=6, with_mask=mask, seed=seed)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_mock_sample_depends_only_on_seed_and_index():
    a, b = _small(seed=1, mask=True), _small(seed=1, mask=True)
    for i in (0, 5, 47):
        for k in a[i]:
            assert torch.equal(a[i][k], b[i][k])
        assert a[i]["latents"].dtype == torch.float32
    assert not torch.equal(a[3]["latents"], _small(seed=2)[3]["latents"])
    big = MockDataset(100, (4, 4), in_channels=4, text_len=5, text_dim=8, pooled_dim=6, seed=1)
    assert torch.equal(big[3]["latents"], a[3]["latents"])  # independent of num_samples


def test_mock_contract_shapes():
    d = MockDataset(3, (6, 8), in_channels=16, text_len=333, text_dim=4096, pooled_dim=2048, with_mask=True)
    s = d[0]
    assert s["latents"].shape == (16, 6, 8) and s["prompt_embeds"].shape == (333, 4096)
    assert s["pooled_prompt_embeds"].shape == (2048,) and s["mask"].shape == (6, 8)
    assert "mask" not in MockDataset(1, (2, 2))[0]


def _global_stream(ds, G, mbs, dp, seed, n_batches, consumed=0, prefetch=2):
    """Concatenate all ranks' microbatch sample indices per global batch."""
    its = [build_data_iterator(ds, G, mbs, r, dp, seed, consumed, prefetch=prefetch) for r in range(dp)]
    out = []
    for _ in range(n_batches):
        row = []
        for it in its:
            for mb in _take(it, G // (mbs * dp)):
                row += mb["sample_index"].tolist()
        out.append(row)
    for it in its:
        it.close()
    return out


@pytest.mark.parametrize("layout", [(1, 12), (2, 1), (2, 3), (4, 1), (3, 2)])
def test_all_dp_layouts_see_the_same_global_batches(layout):
    ds = _small()
    ref = _global_stream(ds, 12, 12, 1, seed=3, n_batches=9)
    dp, mbs = layout
    assert _global_stream(ds, 12, mbs, dp, seed=3, n_batches=9) == ref


def test_dp_ranks_partition_each_global_batch_and_epochs_are_permutations():
    ds = _small(n=50)
    G, dp = 8, 2
    plan = GlobalBatchPlan(np.zeros(50, dtype=np.int64), G, seed=3)
    assert plan.batches_per_epoch == 6
    stream = _global_stream(ds, G, 2, dp, seed=3, n_batches=12)
    for k, row in enumerate(stream):
        assert row == plan.batch(k).tolist() and len(set(row)) == G
    for e in range(2):
        epoch = sum(stream[6 * e: 6 * e + 6], [])
        assert len(set(epoch)) == 48  # no repeats inside an epoch (2 of 50 dropped)
    assert stream[:6] != stream[6:]  # reshuffled each epoch
    assert _global_stream(ds, G, 2, dp, seed=4, n_batches=1) != stream[:1]  # keyed by seed


@pytest.mark.parametrize("prefetch", [0, 2])
def test_exact_resume_from_consumed_samples(prefetch):
    ds = _small(buckets=((4, 4), (2, 8)), mask=True)
    G, mbs, dp = 6, 1, 2
    full = [_take(build_data_iterator(ds, G, mbs, r, dp, seed=11, prefetch=prefetch), 3 * 20) for r in range(dp)]
    for stop in (0, 1, 7, 13):
        for r in range(dp):
            it = build_data_iterator(ds, G, mbs, r, dp, seed=11, consumed_samples=stop * G, prefetch=prefetch)
            resumed = _take(it, 3 * (20 - stop))
            it.close()
            for a, b in zip(full[r][3 * stop:], resumed):
                assert a.keys() == b.keys()
                for k in a:
                    assert torch.equal(a[k], b[k]), (stop, r, k)
    it = build_data_iterator(ds, G, mbs, 0, dp, seed=11, prefetch=prefetch)
    _take(it, 3 * 5)
    assert it.consumed_samples == 5 * G
    it.close()


def test_bucket_homogeneity_and_plan_shapes():
    ds = _small(n=60, buckets=((4, 4), (2, 8), (8, 2)))
    G, mbs, dp = 4, 1, 2
    its = [build_data_iterator(ds, G, mbs, r, dp, seed=5) for r in range(dp)]
    shapes_seen = set()
    for k in range(30):
        expect = its[0].next_latent_shape()
        shapes = {tuple(mb["latents"].shape[-2:]) for it in its for mb in _take(it, G // (mbs * dp))}
        assert shapes == {expect}, (k, shapes, expect)
        assert its[0].plan.latent_shape(k) == expect
        shapes_seen |= shapes
    assert len(shapes_seen) == 3
    for it in its:
        it.close()


def test_keys_restrict_what_is_read_and_mask_completion():
    ds = _small(mask=True)
    mb = next(build_data_iterator(ds, 4, 2, 0, 1, seed=0, keys=("latents", "mask"), prefetch=0))
    assert set(mb) == {"latents", "mask", "sample_index"}
    assert mb["sample_index"].dtype == torch.long and mb["mask"].shape == (2, 4, 4)


def test_layout_errors_are_clear():
    ds = _small()
    with pytest.raises(ValueError, match="not divisible"):
        build_data_iterator(ds, 10, 3, 0, 2, seed=0)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        build_data_iterator(ds, 8, 2, 0, 2, seed=0, consumed_samples=12)
    with pytest.raises(ValueError, match="no bucket holds a full global batch"):
        build_data_iterator(_small(n=5), 8, 2, 0, 2, seed=0)


class _Buckets:
    """Samples of explicit buckets: 10 of 4x4, 3 of 2x8 (fewer than a global batch of 4)."""

    buckets = [(4, 4), (2, 8)]
    bucket_ids = np.array([0] * 10 + [1] * 3)

    def __len__(self):
        return len(self.bucket_ids)

    def __getitem__(self, i):
        h, w = self.buckets[self.bucket_ids[i]]
        return {"latents": torch.full((4, h, w), float(i)), "prompt_embeds": torch.zeros(5, 8),
                "pooled_prompt_embeds": torch.zeros(6)}


def test_small_buckets_are_reported_and_never_trained_by_default():
    from megatron_sd3.data.sampler import small_bucket_report, small_buckets

    ds = _Buckets()
    assert small_buckets(ds.bucket_ids, 4, ds.buckets) == [(1, (2, 8), 3)]
    line = small_bucket_report(ds, 4, False)
    assert "\n" not in line and "bucket 1 (2x8): 3" in line and "never trained on" in line
    assert "--train-small-buckets" in line and "3 of 13 samples" in line
    assert small_bucket_report(ds, 3, False) is None  # 3 samples fill a global batch of 3
    plan = GlobalBatchPlan(ds.bucket_ids, 4, seed=1, buckets=ds.buckets)
    assert plan.batches_per_epoch == 2
    assert all(plan.bucket(k) == 0 for k in range(40))


def test_train_small_buckets_repeats_their_samples_into_one_batch_per_epoch():
    from megatron_sd3.data.sampler import small_bucket_report

    ds = _Buckets()
    assert "repeated" in small_bucket_report(ds, 4, True)
    plan = GlobalBatchPlan(ds.bucket_ids, 4, seed=1, buckets=ds.buckets, train_small_buckets=True)
    assert plan.batches_per_epoch == 3
    repeated = set()
    for e in range(6):
        batches = plan.epoch_batches(e)
        small = [b for b in batches if ds.bucket_ids[b[0]] == 1]
        assert len(small) == 1 and set(small[0]) == {10, 11, 12}  # every sample of the bucket, one repeated
        assert all(len(set(ds.bucket_ids[b])) == 1 for b in batches)  # one latent size per batch
        repeated.add(int(max(small[0], key=list(small[0]).count)))
    assert len(repeated) > 1  # which sample repeats changes with the epoch
    its = [build_data_iterator(ds, 4, 1, r, 2, seed=1, train_small_buckets=True, prefetch=0) for r in range(2)]
    shapes = set()
    for k in range(9):
        got = {tuple(mb["latents"].shape[-2:]) for it in its for mb in _take(it, 2)}
        assert len(got) == 1
        shapes |= got
    assert shapes == {(4, 4), (2, 8)}
