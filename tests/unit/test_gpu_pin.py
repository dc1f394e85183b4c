import pytest

from gateway.core.gpu_pin import Listing, parse_listing, pin_problem

GPU = "GPU-5e2c9c3a-7f6b-4b1e-9d4f-1c2b3a4d5e6f"
OTHER = "GPU-0a1b2c3d-0000-0000-0000-000000000000"
MIG = "MIG-c6d4f1ef-1111-2222-3333-444455556666"
MIG2 = "MIG-0f0f0f0f-1111-2222-3333-444455556666"

ONE_MIG = f"""GPU 0: NVIDIA A100-SXM4-80GB (UUID: {GPU})
  MIG 3g.40gb     Device  0: (UUID: {MIG})
"""
LEGACY = f"""GPU 0: A100-SXM4-40GB (UUID: {GPU})
  MIG 1g.5gb Device 0: (UUID: MIG-{GPU}/7/0)
"""


def test_parse_listing():
    assert parse_listing(ONE_MIG) == Listing((GPU,), (MIG,))
    assert parse_listing(LEGACY).mig_devices == (f"MIG-{GPU}/7/0",)
    assert parse_listing("No devices were found\n") == Listing((), ())


@pytest.mark.parametrize(
    ("allocated", "text", "ok"),
    [
        (MIG, ONE_MIG, True),
        (f"MIG-{GPU}/7/0", LEGACY, True),
        (GPU, f"GPU 0: NVIDIA H100 80GB HBM3 (UUID: {GPU})\n", True),
        (MIG, ONE_MIG + f"  MIG 3g.40gb     Device  1: (UUID: {MIG2})\n", False),
        (MIG, ONE_MIG + f"GPU 1: NVIDIA A100-SXM4-80GB (UUID: {OTHER})\n", False),
        (MIG2, ONE_MIG, False),
        (GPU, ONE_MIG, False),  # a whole GPU must show no MIG device
        (GPU, f"GPU 0: x (UUID: {GPU})\nGPU 1: x (UUID: {OTHER})\n", False),
        (GPU, "No devices were found\n", False),
    ],
)
def test_pin_problem(allocated, text, ok):
    problem = pin_problem(allocated, text)
    assert (problem is None) == ok
    if not ok:
        assert allocated in problem
