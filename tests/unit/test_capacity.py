"""Capacity: resource-string parsing, the committed pool, limits and the host probe."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.job import ResourcesConfig
from worker.capacity.host import count_gpus, free_disk, probe_host, usable_cpus, usable_memory
from worker.capacity.limits import DEFAULT_JOB_USAGE, resolve_limits
from worker.capacity.parse import (
    ResourceParseError,
    parse_bytes,
    parse_cpu,
    parse_gpu,
    parse_resources,
)
from worker.capacity.pool import CapacityPool, Decline
from worker.capacity.usage import ZERO, ResourceUsage

KI, MI, GI = 1024, 1024**2, 1024**3

# -- parsing -------------------------------------------------------------------------------


def test_bacalhau_parser_fixture() -> None:
    got = parse_resources(ResourcesConfig(CPU="100m", Memory="100Mi", Disk="", GPU=""))
    assert got == ResourceUsage(CPU=0.1, Memory=104857600, Disk=0, GPU=0)


@pytest.mark.parametrize(
    ("text", "cores"),
    [
        ("500m", 0.5),
        ("100m", 0.1),
        ("1500m", 1.5),
        ("1.5", 1.5),
        ("2", 2.0),
        ("1.000000", 1.0),
        ("0.5", 0.5),
        (".5", 0.5),
        ("", 0.0),
        ("  ", 0.0),
        (" 2 ", 2.0),
        ("500M", 0.5),
        ("0", 0.0),
        ("0.0001", 0.001),  # whole millicores, rounded up like Kubernetes
        ("2.01", 2.01),
    ],
)
def test_parse_cpu(text: str, cores: float) -> None:
    assert parse_cpu(text) == pytest.approx(cores)


@pytest.mark.parametrize(
    "text", ["abc", "-1", "1.5.5", "1k", "1mm", "nan", "inf", "NaN", "1e3", "+1", "2000000", "x1"]
)
def test_parse_cpu_rejects(text: str) -> None:
    with pytest.raises(ResourceParseError) as info:
        parse_cpu(text)
    assert str(info.value).startswith("CPU ")
    assert isinstance(info.value, ValueError)


def _suffix_cases() -> list[tuple[str, int]]:
    cases: list[tuple[str, int]] = [("1", 1), ("1b", 1), ("1B", 1)]
    for power, p in enumerate("kmgtpe", start=1):
        for suffix in (p, p + "b", p + "i", p + "ib"):
            for spelled in (suffix, suffix.upper(), suffix.capitalize()):
                cases.append((f"3{spelled}", 3 * 1024**power if power < 6 else 3 * 1024**6))
    return cases


@pytest.mark.parametrize(("text", "value"), _suffix_cases())
def test_parse_bytes_every_suffix(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("100Mi", 104857600),
        ("500Mb", 524288000),
        ("1Gb", GI),
        ("1Gi", GI),
        ("1GiB", GI),
        ("1.5Gi", GI * 3 // 2),
        ("1.5gb", GI * 3 // 2),
        ("0.5k", 512),
        ("0.5", 1),  # a fractional byte rounds up
        ("2", 2),
        ("", 0),
        ("1 Gi", GI),
        (" 100 Mi ", 100 * MI),
        ("7e", 7 * 1024**6),
    ],
)
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize(
    "text",
    ["abc", "-1", "-1Gi", "1.5.5", "1x", "1gbb", "1gibb", "nan", "inf", "1e3", "Gi", "8e", "1 0x"],
)
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(ResourceParseError) as info:
        parse_bytes(text, field="Disk")
    assert str(info.value).startswith('Disk "')


@pytest.mark.parametrize(("text", "value"), [("1", 1), ("0", 0), ("", 0), (" 4 ", 4)])
def test_parse_gpu(text: str, value: int) -> None:
    assert parse_gpu(text) == value


@pytest.mark.parametrize("text", ["1.0", "1.5", "-1", "one", "1m", "nan", "99999999"])
def test_parse_gpu_rejects(text: str) -> None:
    with pytest.raises(ResourceParseError, match=r"^GPU "):
        parse_gpu(text)


def test_parse_numbers_from_config() -> None:
    assert parse_cpu(2) == 2.0
    assert parse_cpu(0.25) == 0.25
    assert parse_bytes(1024) == 1024
    assert parse_gpu(2) == 2
    for bad in (float("nan"), float("inf"), -1.0, True):
        with pytest.raises(ResourceParseError):
            parse_cpu(bad)
    with pytest.raises(ResourceParseError):
        parse_gpu(1.0)
    with pytest.raises(ResourceParseError, match="longer than"):
        parse_bytes("1" * 100)


def test_parse_resources_names_the_field() -> None:
    with pytest.raises(ResourceParseError, match=r'^Memory "lots"'):
        parse_resources(ResourcesConfig(CPU="1", Memory="lots"))
    with pytest.raises(ResourceParseError, match=r'^GPU "1\.0"'):
        parse_resources(ResourcesConfig(GPU="1.0"))


# -- pool ----------------------------------------------------------------------------------


def U(cpu: float = 0, mem: int = 0, disk: int = 0, gpu: int = 0) -> ResourceUsage:
    return ResourceUsage(CPU=cpu, Memory=mem, Disk=disk, GPU=gpu)


def make_pool(
    total: ResourceUsage, queue: ResourceUsage | None = None, cap: int = 256
) -> CapacityPool:
    return CapacityPool(
        total=total, queue=queue if queue is not None else ZERO, max_pending_per_requester=cap
    )


def test_pool_reserve_accept_start_release() -> None:
    pool = make_pool(U(2, 1000), U(1, 500))
    changes: list[int] = []
    pool.on_change = lambda: changes.append(1)

    assert pool.try_reserve("e1", "r", U(1, 400)) is None
    assert pool.where("e1") == "pending"
    assert pool.pending_count("r") == 1
    snap = pool.snapshot()
    assert snap.pending == U(1, 400)
    assert snap.available == U(2, 1100)

    pool.accept("e1")
    assert pool.where("e1") == "queued"
    assert pool.pending_count("r") == 0
    assert pool.can_start("e1")
    pool.start("e1")
    assert pool.where("e1") == "running"
    snap = pool.snapshot()
    assert (snap.running, snap.queued, snap.pending) == (U(1, 400), ZERO, ZERO)
    assert (snap.running_count, snap.queued_count, snap.pending_count) == (1, 0, 0)

    pool.release("e1")
    pool.release("e1")  # idempotent
    assert "e1" not in pool
    assert pool.snapshot().available == U(3, 1500)
    assert len(changes) == 4  # reserve, accept, start, release (the second release is no change)


def test_pool_declines_over_total_plus_queue() -> None:
    pool = make_pool(U(2, 1000), U(1, 0))
    assert pool.try_reserve("a", "r", U(2, 600)) is None
    assert pool.try_reserve("b", "r", U(1, 400)) is None
    refused = pool.try_reserve("c", "r", U(0.1, 1))
    assert isinstance(refused, Decline)
    assert refused.retryable
    assert refused.reason.startswith("not enough capacity available: ")
    assert "CPU" in refused.reason and "Memory" in refused.reason
    assert "c" not in pool
    pool.release("b")
    assert pool.try_reserve("c", "r", U(1, 400)) is None


def test_pool_per_requester_cap_checked_first() -> None:
    pool = make_pool(U(1, 100), cap=2)
    assert pool.try_reserve("a", "r1", U(0.5, 50)) is None
    assert pool.try_reserve("b", "r1", U(0.5, 50)) is None
    refused = pool.try_reserve("c", "r1", U(100, 100))  # also over capacity: the cap wins
    assert refused == Decline("too many pending bids from r1", True)
    # Accepted bids are no longer pending, so they no longer count against the share.
    pool.accept("a")
    refused = pool.try_reserve("c", "r1", U(0.5, 50))
    assert refused is not None and refused.reason.startswith("not enough capacity available")
    pool.release("a")
    assert pool.try_reserve("c", "r1", U(0.5, 50)) is None
    assert pool.pending_count("r1") == 2
    assert pool.pending_count("r2") == 0


def test_pool_accepted_reservation_never_fails_and_start_waits_for_room() -> None:
    pool = make_pool(U(1, 100), U(1, 100))
    assert pool.try_reserve("a", "r", U(1, 100)) is None
    assert pool.try_reserve("b", "r", U(1, 100)) is None
    pool.accept("a")
    pool.accept("b")
    assert pool.where("b") == "queued"
    assert pool.try_start("a")
    assert not pool.can_start("b")  # running + usage > total
    assert not pool.try_start("b")
    pool.release("a")
    assert pool.try_start("b")
    assert not pool.can_start("unknown")
    pool.accept("unknown")
    pool.start("unknown")
    assert len(pool) == 1


def test_pool_restore_skips_checks_and_available_clamps() -> None:
    pool = make_pool(U(1, 100))
    pool.restore("a", "r", U(2, 50), "running")
    pool.restore("b", "r", U(1, 10), "queued")
    pool.restore("c", "r", U(0.5, 10), "pending")
    snap = pool.snapshot()
    assert snap.running == U(2, 50)
    assert snap.available == U(0, 30)
    assert pool.pending_count("r") == 1
    pool.restore("c", "r", U(0.5, 10), "queued")  # restoring again moves it
    assert pool.pending_count("r") == 0
    assert pool.snapshot().queued == U(1.5, 20)


def test_pool_rejects_duplicate_ids_and_bad_cap() -> None:
    pool = make_pool(U(1, 100))
    assert pool.try_reserve("a", "r", U(0.1, 1)) is None
    with pytest.raises(ValueError):
        pool.try_reserve("a", "r", U(0.1, 1))
    with pytest.raises(ValueError):
        CapacityPool(total=ZERO, queue=ZERO, max_pending_per_requester=0)


def test_pool_hook_failure_does_not_break_pool(caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(U(1, 100))

    def boom() -> None:
        raise RuntimeError("hook")

    pool.on_change = boom
    assert pool.try_reserve("a", "r", U(0.1, 1)) is None
    assert pool.where("a") == "pending"
    assert "on_change hook failed" in caplog.text


def test_pool_float_sums_return_to_zero() -> None:
    pool = make_pool(U(10, 100))
    for i in range(30):
        assert pool.try_reserve(f"e{i}", "r", U(0.1, 1)) is None
    for i in range(30):
        pool.release(f"e{i}")
    assert pool.snapshot().pending == ZERO
    assert pool.snapshot().available == U(10, 100)


_ops = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "accept", "start", "release"]),
        st.integers(0, 7),
        st.sampled_from(["r1", "r2"]),
        st.floats(0.1, 1.5).map(lambda x: round(x, 1)),
        st.integers(1, 400),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_pool_invariants(ops: list[tuple[str, int, str, float, int]]) -> None:
    total, queue = U(2, 1000, 10, 1), U(1, 500, 0, 0)
    limit = total.add(queue)
    pool = make_pool(total, queue, cap=3)
    for op, n, requester, cpu, mem in ops:
        eid = f"e{n}"
        if op == "reserve" and eid not in pool:
            before = pool.pending_count(requester)
            refused = pool.try_reserve(eid, requester, U(cpu, mem))
            if refused is None:
                assert pool.where(eid) == "pending"
            else:
                assert refused.retryable
                assert eid not in pool
                assert before >= 3 or refused.reason.startswith("not enough capacity")
        elif op == "accept":
            was = pool.where(eid)
            pool.accept(eid)
            assert pool.where(eid) == ("queued" if was == "pending" else was)
        elif op == "start":
            if pool.where(eid) == "queued" and pool.can_start(eid):
                pool.start(eid)
                assert pool.where(eid) == "running"
        elif op == "release":
            pool.release(eid)
            assert eid not in pool
        snap = pool.snapshot()
        committed = snap.running.add(snap.queued).add(snap.pending)
        assert committed.le(limit)
        assert snap.running.le(total)
        for part in (snap.running, snap.queued, snap.pending, snap.available):
            assert min(part.CPU, part.Memory, part.Disk, part.GPU) >= 0
        assert snap.available == limit.sub(committed)
        assert pool.pending_count("r1") <= 3 and pool.pending_count("r2") <= 3


# -- limits --------------------------------------------------------------------------------

HOST = U(1.6, 8 * GI, 100 * GI, 0)


def test_limits_defaults_from_host() -> None:
    limits, warnings = resolve_limits(
        host=HOST,
        total=ZERO,
        job=ZERO,
        queue=ZERO,
        default_job=ZERO,
        job_timeout_default=600,
        job_timeout_min=0.5,
        job_timeout_max=3600,
    )
    assert warnings == []
    assert limits.total == HOST
    assert limits.queue == HOST
    assert limits.job == HOST
    assert limits.default_job == DEFAULT_JOB_USAGE == U(0.1, 100 * MI)
    assert (limits.job_timeout_default, limits.job_timeout_min, limits.job_timeout_max) == (
        600,
        0.5,
        3600,
    )


def test_limits_partial_totals_and_over_host_warning() -> None:
    limits, warnings = resolve_limits(
        host=HOST,
        total=U(cpu=4),
        job=ZERO,
        queue=U(mem=GI),
        default_job=ZERO,
        job_timeout_default=600,
        job_timeout_min=0.5,
        job_timeout_max=3600,
    )
    assert limits.total == U(4, 8 * GI, 100 * GI, 0)
    assert limits.queue == U(4, GI, 100 * GI, 0)
    assert limits.job == limits.total
    assert len(warnings) == 1
    assert "exceed the host" in warnings[0] and "CPU 4" in warnings[0]


def test_limits_clamp_job_default_and_timeout() -> None:
    limits, warnings = resolve_limits(
        host=HOST,
        total=U(2, 1 * GI),
        job=U(3, 2 * GI, 0, 1),
        queue=ZERO,
        default_job=U(cpu=2.5),
        job_timeout_default=7200,
        job_timeout_min=0.5,
        job_timeout_max=3600,
    )
    assert limits.job == U(2, GI, 100 * GI, 0)
    assert limits.default_job == U(2, 100 * MI)
    assert limits.job_timeout_default == 3600
    assert len(warnings) == 4
    assert "exceed the host's usable resources (CPU 2 > 1.6)" in warnings[0]
    assert (
        f"job limits exceed the total limits (CPU 3 > 2, Memory {2 * GI} > {GI}, GPU 1 > 0)"
        in warnings[1]
    )
    assert "default job resources exceed the job limits (CPU 2.5 > 2)" in warnings[2]
    assert "default job timeout 2h0m0s exceeds the maximum 1h0m0s" in warnings[3]


def test_limits_small_machine_never_raises() -> None:
    tiny = U(0.08, 64 * MI, GI, 0)
    limits, warnings = resolve_limits(
        host=tiny,
        total=ZERO,
        job=ZERO,
        queue=ZERO,
        default_job=ZERO,
        job_timeout_default=600,
        job_timeout_min=7200,
        job_timeout_max=3600,
    )
    assert limits.default_job == U(0.08, 64 * MI)
    assert limits.job_timeout_min == 3600
    assert len(warnings) == 2


def test_limits_no_maximum_timeout() -> None:
    limits, warnings = resolve_limits(
        host=HOST,
        total=ZERO,
        job=ZERO,
        queue=ZERO,
        default_job=ZERO,
        job_timeout_default=10**6,
        job_timeout_min=0.5,
        job_timeout_max=0,
    )
    assert warnings == []
    assert limits.job_timeout_default == 10**6


# -- host ----------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _proc(tmp: Path, cgroup: str, mem_kib: int = 4 * 1024 * 1024) -> Path:
    proc = tmp / "proc"
    _write(proc / "self" / "cgroup", cgroup)
    _write(proc / "meminfo", f"MemTotal:       {mem_kib} kB\nMemFree:  1 kB\n")
    return proc


def test_host_cgroup_v2(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "0::/a/b\n")
    cg = tmp_path / "cg"
    _write(cg / "cgroup.controllers", "cpu memory")
    _write(cg / "a" / "b" / "cpu.max", "150000 100000\n")
    _write(cg / "a" / "b" / "memory.max", "max\n")
    _write(cg / "a" / "memory.max", f"{GI}\n")
    _write(cg / "a" / "cpu.max", "max 100000\n")
    assert usable_cpus(proc_root=proc, cgroup_root=cg, cpu_count=4) == 1.5
    assert usable_cpus(proc_root=proc, cgroup_root=cg, cpu_count=1) == 1.0
    assert usable_memory(proc_root=proc, cgroup_root=cg) == GI
    got = probe_host(
        tmp_path, proc_root=proc, cgroup_root=cg, cpu_count=4, nvidia_smi="no-such-nvidia-smi"
    )
    assert got.CPU == 1.2
    assert got.Memory == GI * 8 // 10
    assert got.GPU == 0
    assert got.Disk > 0


def test_host_cgroup_v1(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "4:memory:/x/y\n1:cpu,cpuacct:/x/y\n3:cpuset:/\n0::/\n")
    cg = tmp_path / "cg"
    _write(cg / "memory" / "x" / "y" / "memory.limit_in_bytes", "536870912\n")
    _write(cg / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(cg / "cpu,cpuacct" / "x" / "y" / "cpu.cfs_quota_us", "50000\n")
    _write(cg / "cpu,cpuacct" / "x" / "y" / "cpu.cfs_period_us", "100000\n")
    _write(cg / "unified" / "cgroup.procs", "")  # hybrid: v2 mounted without controllers
    assert usable_cpus(proc_root=proc, cgroup_root=cg, cpu_count=2) == 0.5
    assert usable_memory(proc_root=proc, cgroup_root=cg) == 512 * MI
    got = probe_host(tmp_path, proc_root=proc, cgroup_root=cg, cpu_count=2, nvidia_smi="nope")
    assert got.CPU == 0.4
    assert got.Memory == 512 * MI * 8 // 10


def test_host_cgroup_v1_unlimited(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "4:memory:/x\n1:cpu:/x\n", mem_kib=2 * 1024 * 1024)
    cg = tmp_path / "cg"
    _write(cg / "memory" / "x" / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(cg / "cpu" / "x" / "cpu.cfs_quota_us", "-1\n")
    _write(cg / "cpu" / "x" / "cpu.cfs_period_us", "100000\n")
    assert usable_cpus(proc_root=proc, cgroup_root=cg, cpu_count=2) == 2.0
    assert usable_memory(proc_root=proc, cgroup_root=cg) == 2 * GI
    got = probe_host(tmp_path, proc_root=proc, cgroup_root=cg, cpu_count=2, nvidia_smi="nope")
    assert got.CPU == 1.6


def test_host_container_with_own_cgroup_at_root(tmp_path: Path) -> None:
    # /proc/self/cgroup names a host path that is not mounted; the limit sits at the root.
    proc = _proc(tmp_path, "4:memory:/docker/abc\n2:cpu:/docker/abc\n")
    cg = tmp_path / "cg"
    _write(cg / "memory" / "memory.limit_in_bytes", f"{2 * GI}\n")
    _write(cg / "cpu" / "cpu.cfs_quota_us", "200000\n")
    _write(cg / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert usable_cpus(proc_root=proc, cgroup_root=cg, cpu_count=8) == 2.0
    assert usable_memory(proc_root=proc, cgroup_root=cg) == 2 * GI


def test_host_without_cgroups(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "")
    cg = tmp_path / "missing"
    assert usable_cpus(proc_root=proc, cgroup_root=cg, cpu_count=3) == 3.0
    assert usable_memory(proc_root=proc, cgroup_root=cg) == 4 * GI


def test_host_real_machine(tmp_path: Path) -> None:
    got = probe_host(tmp_path / "not" / "yet" / "created")
    assert got.CPU > 0
    assert got.Memory > 0
    assert got.Disk > 0
    assert got.GPU >= 0
    assert free_disk(tmp_path / "missing") > 0
    assert len(os.sched_getaffinity(0)) * 0.8 >= got.CPU


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_count_gpus(tmp_path: Path) -> None:
    assert count_gpus("definitely-not-installed-nvidia-smi") == 0
    two = _script(tmp_path / "smi2", 'echo "0"\necho "1"\n')
    assert count_gpus(two) == 2
    failing = _script(tmp_path / "smi-fail", "echo 0\nexit 9\n")
    assert count_gpus(failing) == 0
    hung = _script(tmp_path / "smi-hung", "sleep 30\n")
    assert count_gpus(hung, timeout=0.2) == 0
    got = probe_host(tmp_path, nvidia_smi=two)
    assert got.GPU == 2
