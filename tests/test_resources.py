"""Thread splitting and GPU slots for concurrent local jobs, with faked machine sizes."""

from stability.resources import Resources, plan


def test_two_jobs_on_two_cores_get_one_thread_each():
    assert plan(0, concurrency=2, n_cpus=2, n_gpus=0) == Resources(1, None, None)
    assert plan(0, concurrency=1, n_cpus=2, n_gpus=0) == Resources(2, None, None)
    assert plan(5, concurrency=8, n_cpus=2, n_gpus=0).threads == 1  # never zero


def test_concurrent_jobs_round_robin_over_gpus():
    slots = [plan(j, concurrency=4, n_cpus=16, n_gpus=4) for j in range(6)]
    assert [r.slot for r in slots] == [0, 1, 2, 3, 0, 1]
    assert [r.device for r in slots[:2]] == ["cuda:0", "cuda:1"]
    assert all(r.threads == 4 for r in slots)


def test_one_gpu_or_one_job_leaves_the_device_alone():
    assert plan(3, concurrency=4, n_cpus=16, n_gpus=1).device is None
    assert plan(3, concurrency=1, n_cpus=16, n_gpus=4).device is None
