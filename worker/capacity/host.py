"""What the host can give: 80 % of CPU, memory and data-dir disk, and its GPUs.

Bacalhau counted the host's CPUs and RAM even inside a container limited to less (#3087),
so it bid on jobs the container could never run. Here the CPU count honours the affinity
mask and the cgroup CPU quota, and memory is the smaller of ``MemTotal`` and the cgroup
limit, on cgroup v2, v1 and hybrid hosts. Limits are hierarchical, so every level from the
process's cgroup up to the mount root is read and the smallest wins; the walk also covers a
container whose own cgroup is mounted at the root while ``/proc/self/cgroup`` names a
host path. ``proc_root`` and ``cgroup_root`` are parameters so tests can use fake trees.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
from pathlib import Path

from worker.capacity.usage import ResourceUsage

SHARE = 0.8
_UNLIMITED = 2**60
"""cgroup v1 writes "no limit" as a page-rounded 2**63 - 1; anything this big is none."""


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _cgroup_paths(proc_root: Path) -> dict[str, str]:
    """Controller → cgroup path from ``/proc/self/cgroup`` (``""`` is the v2 hierarchy)."""
    text = _read(proc_root / "self" / "cgroup") or ""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            paths[""] = path
        for name in controllers.split(","):
            if name:
                paths[name] = path
    return paths


def _levels(base: Path, cgroup_path: str) -> list[Path]:
    """``base/cgroup_path`` and each ancestor up to ``base``, deepest first."""
    rel = Path(cgroup_path.lstrip("/"))
    out = [base / rel]
    out.extend(base / p for p in rel.parents)
    return out


def _v2_base(cgroup_root: Path) -> Path:
    if (cgroup_root / "cgroup.controllers").exists():
        return cgroup_root
    return cgroup_root / "unified"


def _v1_bases(cgroup_root: Path, controller: str) -> list[Path]:
    bases = [cgroup_root / controller]
    try:
        names = sorted(p.name for p in cgroup_root.iterdir())
    except OSError:
        names = []
    bases.extend(cgroup_root / n for n in names if "," in n and controller in n.split(","))
    return [b for b in bases if b.is_dir()]


def _cpu_quota(proc_root: Path, cgroup_root: Path) -> float | None:
    """The smallest CPU quota in cores along the process's cgroups, or None."""
    paths = _cgroup_paths(proc_root)
    quotas: list[float] = []
    if "" in paths:
        for level in _levels(_v2_base(cgroup_root), paths[""]):
            fields = (_read(level / "cpu.max") or "").split()
            if len(fields) == 2 and fields[0] != "max":
                try:
                    quota, period = int(fields[0]), int(fields[1])
                except ValueError:
                    continue
                if quota > 0 and period > 0:
                    quotas.append(quota / period)
    if "cpu" in paths:
        for base in _v1_bases(cgroup_root, "cpu"):
            for level in _levels(base, paths["cpu"]):
                quota_text = _read(level / "cpu.cfs_quota_us")
                period_text = _read(level / "cpu.cfs_period_us")
                try:
                    quota, period = int(quota_text or ""), int(period_text or "")
                except ValueError:
                    continue
                if quota > 0 and period > 0:
                    quotas.append(quota / period)
    return min(quotas) if quotas else None


def _memory_limit(proc_root: Path, cgroup_root: Path) -> int | None:
    """The smallest cgroup memory limit in bytes along the process's cgroups, or None."""
    paths = _cgroup_paths(proc_root)
    limits: list[int] = []
    candidates: list[Path] = []
    if "" in paths:
        candidates += [p / "memory.max" for p in _levels(_v2_base(cgroup_root), paths[""])]
    if "memory" in paths:
        for base in _v1_bases(cgroup_root, "memory"):
            candidates += [p / "memory.limit_in_bytes" for p in _levels(base, paths["memory"])]
    for file in candidates:
        text = _read(file)
        if text is None or text == "max":
            continue
        try:
            value = int(text)
        except ValueError:
            continue
        if 0 < value < _UNLIMITED:
            limits.append(value)
    return min(limits) if limits else None


def usable_cpus(
    *,
    proc_root: Path = Path("/proc"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    cpu_count: int | None = None,
) -> float:
    """CPUs this process may use: the affinity mask, capped by any cgroup quota."""
    if cpu_count is None:
        try:
            cpu_count = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            cpu_count = os.cpu_count() or 1
    quota = _cpu_quota(proc_root, cgroup_root)
    return float(cpu_count) if quota is None else min(float(cpu_count), quota)


def usable_memory(
    *, proc_root: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> int:
    """Bytes of memory: ``MemTotal`` capped by any cgroup limit."""
    total = 0
    for line in (_read(proc_root / "meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                total = int(fields[1]) * 1024
            break
    if total == 0:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):  # pragma: no cover - not POSIX
            total = 0
    limit = _memory_limit(proc_root, cgroup_root)
    if limit is None:
        return total
    return limit if total == 0 else min(total, limit)


def free_disk(data_dir: Path) -> int:
    """Free bytes on the filesystem that holds ``data_dir`` (or its nearest ancestor)."""
    path = data_dir.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def count_gpus(nvidia_smi: str = "nvidia-smi", *, timeout: float = 2.0) -> int:
    """GPUs listed by ``nvidia-smi``; 0 when it is absent, fails or overruns ``timeout``."""
    binary = shutil.which(nvidia_smi)
    if binary is None:
        return 0
    try:
        proc = subprocess.Popen(
            [binary, "--query-gpu=index", "--format=csv,noheader"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        return 0
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # stuck in the driver: give up
            proc.communicate(timeout=1.0)
        return 0
    if proc.returncode != 0:
        return 0
    return sum(1 for line in out.decode(errors="replace").splitlines() if line.strip())


def probe_host(
    data_dir: Path,
    *,
    gpu_timeout: float = 2.0,
    proc_root: Path = Path("/proc"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    cpu_count: int | None = None,
    nvidia_smi: str = "nvidia-smi",
) -> ResourceUsage:
    """80 % of usable CPUs, memory and data-dir free space, and every GPU (Bacalhau's
    ``PhysicalCapacityProvider``, corrected for cgroups and affinity)."""
    cpus = usable_cpus(proc_root=proc_root, cgroup_root=cgroup_root, cpu_count=cpu_count)
    memory = usable_memory(proc_root=proc_root, cgroup_root=cgroup_root)
    return ResourceUsage(
        CPU=math.floor(cpus * SHARE * 1000 + 1e-6) / 1000,
        Memory=memory * 8 // 10,
        Disk=free_disk(data_dir) * 8 // 10,
        GPU=count_gpus(nvidia_smi, timeout=gpu_timeout),
    )
