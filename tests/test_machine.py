"""Machine facts: /proc/cpuinfo parsed into ISA features and a machine key (fixtures of a Zen 3 without
AVX-512 and a Zen 4 with VNNI/BF16, never only the host's), carried by the records' device block, and
``compare`` warning when its rows come from different machines."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from patholite.accelerators.machine import (
    CpuInfo,
    cpu_quota,
    describe_cpu,
    isa_features,
    machine_identity,
    machine_label,
    microarchitecture,
    parse_cpuinfo,
)
from patholite.accelerators.resolve import resolve_accelerator
from patholite.compare import main
from patholite.config.schema import AcceleratorConfig
from patholite.measure.compare import compare, find_records
from patholite.records import RunRecord, read_record
from tests.test_compare import art

_COMMON = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
    "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid "
    "extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt "
    "tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a "
    "misalignsse 3dnowprefetch osvw topoext invpcid_single ssbd ibrs ibpb stibp vmmcall fsgsbase "
    "tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec "
    "xgetbv1 xsaves clzero xsaveerptr arat umip vaes vpclmulqdq rdpid fsrm"
)
ZEN4_EXTRA = (
    " avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vbmi2 gfni "
    "avx512_vnni avx512_bitalg avx512_vpopcntdq"
)


def _processor(n: int, model: int, stepping: int, core: int, flags: str, siblings: int, cores: int) -> str:
    return (
        f"processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: {model}\n"
        f"model name\t: AMD EPYC\nstepping\t: {stepping}\nmicrocode\t: 0x1000065\ncpu MHz\t\t: 2595.124\n"
        f"cache size\t: 512 KB\nphysical id\t: 0\nsiblings\t: {siblings}\ncore id\t\t: {core}\n"
        f"cpu cores\t: {cores}\napicid\t\t: {n}\nfpu\t\t: yes\nflags\t\t: {flags}\n"
        "bogomips\t: 5190.24\nTLB size\t: 2560 4K pages\naddress sizes\t: 48 bits physical, 48 bits virtual\n"
        "power management:\n"
    )


# Zen 3 (EPYC Milan, family 25 model 1): 4 logical CPUs on 2 cores (SMT), AVX2 and FMA, no AVX-512.
ZEN3 = "\n".join(_processor(n, 1, 1, n // 2, _COMMON, 4, 2) for n in range(4))
# Zen 4 (EPYC Genoa, family 25 model 17): 2 cores without SMT, AVX-512 with VNNI and BF16.
ZEN4 = "\n".join(_processor(n, 17, 1, n, _COMMON + ZEN4_EXTRA, 2, 2) for n in range(2))
ARM = (
    "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
    "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs i8mm bf16\nCPU implementer\t: 0x41\n"
    "CPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd0c\nCPU revision\t: 1\n"
)


def test_zen3_fixture_has_avx2_only_and_counts_cores_apart_from_hyperthreads():
    info = parse_cpuinfo(ZEN3)
    assert (info.model_name, info.vendor, info.family, info.model, info.stepping) == (
        "AMD EPYC", "AuthenticAMD", 25, 1, 1,
    )  # fmt: skip
    assert (info.logical_cpus, info.physical_cores) == (4, 2)
    assert microarchitecture(info) == "Zen 3"
    features = isa_features(info, machine="x86_64")
    assert features["avx2"] and features["fma"]
    assert not any(features[f] for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "avx_vnni"))


def test_zen4_fixture_has_vnni_and_bf16():
    info = parse_cpuinfo(ZEN4)
    assert (info.family, info.model, info.logical_cpus, info.physical_cores) == (25, 17, 2, 2)
    assert microarchitecture(info) == "Zen 4"
    features = isa_features(info, machine="x86_64")
    assert all(features[f] for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"))
    assert not any(features[f] for f in ("amx_tile", "amx_int8", "amx_bf16", "avx_vnni"))


def test_same_model_string_two_machines_two_keys_and_labels():
    zen3, zen4 = describe_cpu(parse_cpuinfo(ZEN3)), describe_cpu(parse_cpuinfo(ZEN4))
    assert zen3["cpu"] == zen4["cpu"] == "AMD EPYC"  # what records held before: it cannot tell them apart
    assert zen3["machine_key"] != zen4["machine_key"] and len(zen3["machine_key"]) == 12
    assert zen3["machine_key"] == describe_cpu(parse_cpuinfo(ZEN3))["machine_key"]  # stable
    cores = zen3["cpu_usable"]
    assert zen3["machine_label"] == f"AMD EPYC (Zen 3: avx2, fma), {cores} cores"
    assert zen4["machine_label"] == f"AMD EPYC (Zen 4: avx512_vnni, avx512_bf16), {cores} cores"


def test_flags_outside_the_list_do_not_change_the_key():
    """A newer kernel naming one more flag is the same machine."""
    more = ZEN4.replace("fsrm", "fsrm user_shstk")
    assert (
        describe_cpu(parse_cpuinfo(more))["machine_key"] == describe_cpu(parse_cpuinfo(ZEN4))["machine_key"]
    )


def test_no_cpuinfo_says_unknown_and_arm_reads_its_features():
    assert isa_features(parse_cpuinfo(""), machine="x86_64") == "unknown"
    facts = describe_cpu(CpuInfo())
    assert facts["cpu_features"] == "unknown" and "features unknown" in facts["machine_label"]
    arm = isa_features(parse_cpuinfo(ARM), machine="aarch64")
    assert arm == {"asimddp": True, "i8mm": True, "bf16": True, "sve": False}


@pytest.mark.parametrize(
    ("vendor", "family", "model", "stepping", "arch"),
    [
        ("AuthenticAMD", 0x17, 0x31, 0, "Zen 2"),
        ("AuthenticAMD", 0x19, 0x01, 1, "Zen 3"),
        ("AuthenticAMD", 0x19, 0x61, 2, "Zen 4"),
        ("AuthenticAMD", 0x1A, 0x02, 0, "Zen 5"),
        ("GenuineIntel", 6, 0x55, 7, "Cascade Lake"),
        ("GenuineIntel", 6, 0x55, 4, "Skylake-SP"),
        ("GenuineIntel", 6, 0x8F, 8, "Sapphire Rapids"),
        ("GenuineIntel", 6, 0x3A, 9, None),  # not in the table: the features still tell
    ],
)
def test_microarchitecture_table(vendor, family, model, stepping, arch):
    info = CpuInfo(vendor=vendor, family=family, model=model, stepping=stepping)
    assert microarchitecture(info) == arch


def test_cgroup_quota(tmp_path):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert cpu_quota(quota) == 1.5
    quota.write_text("max 100000\n")
    assert cpu_quota(quota) is None
    assert cpu_quota(tmp_path / "absent") is None


def test_the_record_device_block_carries_the_isa_features(tmp_path):
    """What train and bench write as ``record.device`` (the resolved accelerator's description), kept across
    the record's write and read, with the keys older readers use."""
    accel = resolve_accelerator(OmegaConf.merge(OmegaConf.structured(AcceleratorConfig), {"name": "cpu"}))
    device = accel.describe()
    for key in ("cpu", "cpu_count", "torch_threads", "machine", "kind", "int8_engine"):
        assert key in device
    features = device["cpu_features"]
    assert features == "unknown" or {"avx2", "avx512_vnni", "avx512_bf16", "amx_int8"} <= set(features)
    assert len(device["machine_key"]) == 12 and device["cpu_usable"] >= 1
    assert device["torch_cpu_capability"]
    record = RunRecord(run_dir=str(tmp_path), config={}, device=device)
    record.finish("ok")
    assert read_record(tmp_path / "metrics.json")["device"] == device


def write_run(run_dir: Path, technique: str, artifacts: list, device: dict) -> None:
    RunRecord(
        run_dir=str(run_dir),
        config={"compression": {"name": technique}, "model": {"name": "deit_tiny"}, "dataset": {"name": "s"}},
        job={"sweep_dir": str(run_dir.parent)},
        device={"kind": "cpu", **device},
        artifacts=artifacts,
    ).finish("ok")


@pytest.fixture
def machines() -> tuple[dict, dict]:
    return describe_cpu(parse_cpuinfo(ZEN3)), describe_cpu(parse_cpuinfo(ZEN4))


def test_compare_warns_when_rows_come_from_two_machines(tmp_path, machines, capsys):
    zen3, zen4 = machines
    write_run(tmp_path / "a" / "0", "none", [art("fp32", 0.90, 20.0, {8: 50.0})], zen3)
    write_run(tmp_path / "b" / "0", "none", [art("fp32", 0.90, 20.0, {8: 40.0})], zen4)
    write_run(tmp_path / "b" / "1", "ptq", [art("int8_dynamic", 0.89, 5.0, {8: 20.0})], zen4)
    out = tmp_path / "report"
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])

    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "WARNING: these rows come from 2 different machines" in printed
    for m in (zen3, zen4):
        assert m["machine_label"] in printed and m["machine_key"] in printed
    markdown = (out / "compare.md").read_text()
    assert "> **WARNING: these rows come from 2 different machines" in markdown
    assert zen3["machine_label"] in markdown and zen4["machine_label"] in markdown
    assert "| machine |" in markdown  # each row names its machine
    rows = list(csv.DictReader((out / "compare.csv").read_text().splitlines()))
    assert [r["machine_key"] for r in rows] == [zen3["machine_key"], zen4["machine_key"], zen4["machine_key"]]
    assert rows[2]["baseline"] == "none/fp32" and float(rows[2]["latency_ratio_b8"]) == pytest.approx(0.5)


def test_compare_on_one_machine_names_it_once_without_a_warning(tmp_path, machines, capsys):
    _, zen4 = machines
    write_run(tmp_path / "s" / "0", "none", [art("fp32", 0.90, 20.0, {8: 40.0})], zen4)
    write_run(tmp_path / "s" / "1", "ptq", [art("int8_dynamic", 0.89, 5.0, {8: 20.0})], zen4)
    out = tmp_path / "report"
    main([str(tmp_path / "s"), "--out", str(out)])
    printed = " ".join(capsys.readouterr().out.split())
    assert "WARNING" not in printed and zen4["machine_label"] in printed
    markdown = (out / "compare.md").read_text()
    assert "WARNING" not in markdown and "| machine |" not in markdown
    assert f"Machine: {zen4['machine_label']} [{zen4['machine_key']}]" in markdown


def test_records_without_machine_facts_are_an_unknown_machine_and_a_mix_warns(tmp_path, machines):
    _, zen4 = machines
    write_run(tmp_path / "old" / "0", "none", [art("fp32", 0.90, 20.0, {8: 80.0})], {"cpu": "AMD EPYC"})
    ptq = [art("fp32", 0.9, 20.0, {8: 40.0}), art("int8_dynamic", 0.89, 5.0, {8: 20.0}, source="fp32")]
    write_run(tmp_path / "new" / "0", "ptq", ptq, zen4)
    comparison = compare(find_records([tmp_path / "old", tmp_path / "new"]))
    assert [(m.key, m.label, m.rows) for m in comparison.machines] == [
        (None, "unknown machine", 1),
        (zen4["machine_key"], zen4["machine_label"], 2),
    ]
    assert "unknown machine [no machine_key]: 1 row" in comparison.machine_warning
    # The plain row is on another (unknown) machine: the INT8 row's latency is not divided by it.
    int8 = comparison.rows[2]
    assert int8["baseline"] == "ptq/fp32" and int8["latency_ratio_b8"] == pytest.approx(0.5)
    only_old = compare(find_records([tmp_path / "old"]))
    assert only_old.machine_warning is None and "unknown machine" in only_old.machine_line


def test_a_gpu_makes_another_machine():
    cpu = describe_cpu(parse_cpuinfo(ZEN4))
    gpu = {**cpu, "gpu": "NVIDIA H100"}
    assert machine_identity(cpu) != machine_identity(gpu)
    assert machine_label(gpu).endswith(", NVIDIA H100")
    assert machine_label({"cpu": "AMD EPYC"}) == "unknown machine" and machine_identity({}) is None


def test_the_slide_comparisons_bench_records_carry_the_machine(tmp_path):
    """The SMT-against-tiling records are timings too: they name their machine like bench's."""
    from patholite.slides.comparison import comparison_results, slide_scores, write_records
    from tests.test_bench_smt import _rows

    rows = _rows()
    meta = {"model": {"smt": {"image_size": 32, "grid": 4, "top_k": 2, "layers": 3, "aggregate": "mean"}}}
    results = comparison_results(rows, slide_scores(rows), meta, {"mpp": 2.0}, 2048, resamples=20)
    cfg = OmegaConf.create({"model": {"name": "smt_micro", "smt": meta["model"]["smt"]}, "dataset": {}})
    write_records(tmp_path, cfg, results["quality"], rows)
    comparison = compare(find_records([tmp_path / "records"]))
    assert len(comparison.machines) == 1 and comparison.machines[0].key is not None
    assert comparison.rows[0]["machine_key"] == describe_cpu()["machine_key"]


def test_the_run_table_of_train_bench_and_sweep_names_the_machine(machines):
    from patholite.measure.report import machine_caption

    zen3, zen4 = machines
    assert machine_caption([{"device": zen4}]) == f"machine: {zen4['machine_label']}"
    both = machine_caption([{"device": zen3}, {"device": zen4}, {"device": zen4}])
    assert both.count("AMD EPYC") == 2 and "not comparable" in both
    assert machine_caption([{"device": {}}]) is None  # a job that failed before its device was known
