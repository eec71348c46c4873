"""modasm.comm: bytes and seconds of a step's communication, worked out by hand.

Ψ = 631 922 920: ViT-H/14's parameters (tests/test_estimate.py counts them). 32 ranks on four nodes at a bus
bandwidth of 150 GB/s. Ring factors (nccl-tests doc/PERFORMANCE.md): all-reduce 2(n-1)/n = 2 x 31/32 = 1.9375,
all-gather and reduce-scatter (n-1)/n = 31/32 = 0.96875. bf16 training: weights gathered in bf16 (2 bytes); the
gradients in the communication dtype (fp32: 4 bytes, bf16: 2).
"""
import pytest

from modasm import comm
from modasm.comm import Setting

PSI = 631_922_920
N, BW = 32, 150.0  # ranks, GB/s
AR, AG = 1.9375, 0.96875


@pytest.mark.parametrize("stage, dtype, volume", [
    # ZeRO-1 (BF16_Optimizer): gradients all-reduced once per optimizer step, after the backward, whatever the
    # accumulation; then the updated bf16 weights all-gathered
    (1, "fp32", AR * 4 * PSI + AG * 2 * PSI),          # 4 897 402 630 + 1 224 350 657.5 = 6 121 753 287.5 bytes
    (1, "bf16", AR * 2 * PSI + AG * 2 * PSI),          # 2 448 701 315 + 1 224 350 657.5 = 3 673 051 972.5
    # ZeRO-2: an all-reduce of the gradients at each of the 2 micro-steps, one all-gather of the weights
    (2, "fp32", 2 * AR * 4 * PSI + AG * 2 * PSI),      # 11 019 155 917.5
    (2, "bf16", 2 * AR * 2 * PSI + AG * 2 * PSI),      # 6 121 753 287.5
    # ZeRO-3: per micro-step the weights gathered twice (forward, backward) and the gradients reduce-scattered
    (3, "fp32", 2 * (2 * AG * 2 * PSI + AG * 4 * PSI)),  # 9 794 805 260: the ZeRO paper's 3Ψ per micro-step
    (3, "bf16", 2 * (2 * AG * 2 * PSI + AG * 2 * PSI)),  # 7 346 103 945
])
def test_bytes_and_seconds_without_overlap(stage, dtype, volume):
    s = Setting(stage, "bf16", dtype, overlap=False)
    t = comm.step_time(s, PSI, PSI, N, accum=2, compute=1.0, forward_fraction=1 / 3, busbw_gbs=BW)
    assert t.volume == pytest.approx(volume, rel=1e-12)
    assert t.comm == pytest.approx(volume / 150e9, rel=1e-12) and t.exposed == t.comm  # nothing hidden
    assert t.total == pytest.approx(1.0 + volume / 150e9)


def test_the_numbers_spelled_out():
    """The table above in the units a reader checks: ZeRO-1 with fp32 communication moves 6.12 GB per rank, 40.8 ms
    at 150 GB/s; with bf16 communication 3.67 GB, 24.5 ms."""
    s1 = comm.step_time(Setting(1, "bf16", "fp32"), PSI, PSI, N, 1, 1.0, 1 / 3, BW)
    assert round(s1.volume) == 6_121_753_288 and round(s1.comm * 1e6) == 40_812
    s1b = comm.step_time(Setting(1, "bf16", "bf16"), PSI, PSI, N, 1, 1.0, 1 / 3, BW)
    assert round(s1b.volume) == 3_673_051_972 and round(s1b.comm * 1e6) == 24_487
    # fp32 training moves fp32 weights too, whatever communication_dtype says (DeepSpeed applies it to bf16 only)
    s1f = comm.step_time(Setting(1, "fp32", "bf16"), PSI, PSI, N, 1, 1.0, 1 / 3, BW)
    assert s1f.volume == pytest.approx(AR * 4 * PSI + AG * 4 * PSI)
    # one rank: nothing to send; ZeRO-0 (fp32): one all-reduce of fp32 gradients, nothing after the step
    assert comm.step_time(Setting(2, "bf16", "fp32"), PSI, PSI, 1, 1, 1.0, 1 / 3, BW).exposed == 0.0
    s0 = comm.step_time(Setting(0, "fp32", "fp32"), PSI, PSI, N, 4, 1.0, 1 / 3, BW)
    assert s0.volume == pytest.approx(AR * 4 * PSI)


def test_frozen_weights_are_not_reduced():
    """Incubation: only module k trains. ZeRO-1/2 move its gradients and weights; ZeRO-3 also gathers the frozen
    weights it partitions (2 bytes each, forward and backward)."""
    trainable, total = 158_472_960, 218_777_320   # hybrid(0) of ViT-H: 8 blocks + embeddings of 11 + head
    s1 = comm.step_time(Setting(1, "bf16", "fp32"), trainable, total, 8, 1, 1.0, 1 / 3, 231.0)
    # 8 ranks: all-reduce 2 x 7/8 = 1.75, all-gather 7/8 = 0.875: 1.75 x 4t + 0.875 x 2t = 8.75 t
    assert s1.volume == pytest.approx(8.75 * 158_472_960) and s1.volume == pytest.approx(1_386_638_400)
    assert s1.comm == pytest.approx(1_386_638_400 / 231e9)              # 6.003 ms
    s3 = comm.step_time(Setting(3, "bf16", "fp32"), trainable, total, 8, 1, 1.0, 1 / 3, 231.0)
    assert s3.volume == pytest.approx(0.875 * (2 * 2 * 218_777_320 + 4 * 158_472_960))


def test_overlap_hides_all_but_the_last_bucket():
    """ZeRO-2, fp32 gradients, one micro-step of 1 s, a third of it forward: the backward lasts 2/3 s and produces
    Ψ gradients at an even rate. Buckets of 1e8 elements: six full ones and 31 922 920 elements; each full
    bucket (4e8 bytes, 5.17 ms at 150 GB/s) is reduced within the 105.5 ms the backward takes to fill the next, so
    the step waits for the last bucket (31 922 920 x 4 x 1.9375 / 150e9 = 1.649 ms) and the bf16 weights'
    all-gather after the step (1 224 350 657.5 / 150e9 = 8.162 ms)."""
    s = Setting(2, "bf16", "fp32", overlap=True, bucket=100_000_000)
    t = comm.step_time(s, PSI, PSI, N, 1, 1.0, 1 / 3, BW)
    last, gather = 31_922_920 * 4 * AR / 150e9, AG * 2 * PSI / 150e9
    assert t.exposed == pytest.approx(last + gather) and t.exposed == pytest.approx(0.0098117, abs=1e-7)
    assert t.comm == pytest.approx((AR * 4 * PSI + AG * 2 * PSI) / 150e9)  # the bytes do not change
    # DeepSpeed's default bucket (5e8): the first is full at 5e8/Ψ of the backward (0.527 s), reduced by 0.553 s;
    # the second (131 922 920 elements, 6.816 ms) only after the backward: 6.816 + 8.162 ms
    d = comm.step_time(Setting(2, "bf16", "fp32", overlap=True), PSI, PSI, N, 1, 1.0, 1 / 3, BW)
    assert d.exposed == pytest.approx(131_922_920 * 4 * AR / 150e9 + gather) and d.exposed == pytest.approx(
        0.0149784, abs=1e-7)
    # a network ten times slower (15 GB/s): the first bucket (258.3 ms) is still being reduced at the end of the
    # backward (0.5275 + 0.2583 = 0.7858 s > 0.6667 s), the second queues behind it (68.16 ms): the step waits
    # 0.7858 + 0.0682 - 0.6667 = 0.1873 s, and 81.62 ms for the gather
    slow = comm.step_time(Setting(2, "bf16", "fp32", overlap=True), PSI, PSI, N, 1, 1.0, 1 / 3, 15.0)
    ready = 2 / 3 * 500_000_000 / PSI
    expect = ready + 2e9 * AR / 15e9 + 131_922_920 * 4 * AR / 15e9 - 2 / 3 + AG * 2 * PSI / 15e9
    assert slow.exposed == pytest.approx(expect) and slow.exposed == pytest.approx(0.268941, abs=1e-6)


def test_zero3_overlap_and_where_gradients_appear():
    """ZeRO-3 with overlap: the forward's gather (8.16 ms) hides in the 1/3 s forward; in the backward the stream
    gathers first, then reduce-scatters buckets as they fill: only the last one's 31 922 920 x 4 x 0.96875 / 150e9
    = 0.825 ms shows."""
    t = comm.step_time(Setting(3, "bf16", "fp32", overlap=True, bucket=100_000_000), PSI, PSI, N, 1, 1.0, 1 / 3, BW)
    assert t.exposed == pytest.approx(31_922_920 * 4 * AG / 150e9) and t.exposed == pytest.approx(8.2468e-4, rel=1e-4)
    # grad_window: 2e8 trainable parameters, two buckets, 2 ranks (all-reduce factor 1) at 2 GB/s: 0.2 s per fp32
    # bucket, 0.1 s for the bf16 weights' gather. Gradients over the whole backward (2/3 s): the buckets are ready at
    # 1/3 and 2/3 s, the second done at 2/3 + 0.2: exposed 0.2 + 0.1. Over its last half only (a hybrid whose frozen
    # modules' backward comes first): ready at 1/2 and 2/3 s, the first done at 0.7, the second at 0.9: 0.2333 + 0.1
    s = Setting(2, "bf16", "fp32", overlap=True, bucket=100_000_000)
    whole = comm.step_time(s, 200_000_000, 200_000_000, 2, 1, 1.0, 1 / 3, 2.0)
    half = comm.step_time(s, 200_000_000, 200_000_000, 2, 1, 1.0, 1 / 3, 2.0, grad_window=0.5)
    assert whole.exposed == pytest.approx(0.2 + 0.1) and half.exposed == pytest.approx(0.9 - 2 / 3 + 0.1)


def test_network_defaults_and_overrides():
    """Bus bandwidths: NVLink line rate x the fraction NCCL achieves; over nodes, the lower of that and the node's
    NICs (GPUs per node x line rate per GPU x their achievable fraction)."""
    a100 = comm.network("a100-80gb")
    assert a100.intra == pytest.approx(300 * 0.77) and a100.inter == pytest.approx(200 / 8 * 0.96 * 8)  # 231, 192
    assert (a100.busbw(8), a100.busbw(9), a100.nodes(32)) == (a100.intra, a100.inter, 4)
    h100 = comm.network("h100-80gb")
    assert h100.intra == pytest.approx(369.0) and h100.inter == pytest.approx(369.0)  # NICs: 8 x 47 = 376 > 369
    assert comm.network("h100-80gb", net_gbps=50).inter == pytest.approx(47.0)  # one 400 Gb/s NIC per 8 GPUs
    assert comm.network("a100-80gb", gpus_per_node=4).inter == pytest.approx(25 * 0.96 * 4)  # 96 GB/s
    m = comm.network("a100-80gb", measured={"intra": 300.0})
    assert (m.intra, m.inter) == (300.0, pytest.approx(192.0))
    assert comm.network("a100-80gb", measured={"inter": 80.0}).inter == 80.0
    from modasm import perf
    assert set(comm.LINKS) == {g.key for g in perf.GPUS}  # every GPU the estimate knows has links
