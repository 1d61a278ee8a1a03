"""`onellm parity-inputs`: real files through the upload path against the tensors the authors'
preprocessing made from them (../shared/fixtures/preprocess-ref), and the checker itself on
fixtures of the same format that must fail."""

import json

from safetensors.torch import load_file, save_file

from server.cli import main


def rows(output: str) -> dict[str, str]:
    """case name -> its table row."""
    return {line.split()[0]: line for line in output.splitlines()[1:-1]}


def test_every_case_of_the_shared_fixture_matches(preprocess_fixture, capsys):
    assert main(["parity-inputs", str(preprocess_fixture)]) == 0
    output = capsys.readouterr().out
    cases = json.loads((preprocess_fixture / "cases.json").read_text())["cases"]
    table = rows(output)
    assert set(table) == {case["name"] for case in cases}
    assert all(row.split()[-1] == "ok" for row in table.values()), output


def derived_fixture(source, folder, names, change):
    """A fixture of `source`'s cases `names`, files referred to where they are (never copied),
    the expected tensors passed through `change(name, tensor)`."""
    cases = [dict(case, files={f: str(source / p) for f, p in case["files"].items()})
             for case in json.loads((source / "cases.json").read_text())["cases"] if case["name"] in names]
    (folder / "cases.json").write_text(json.dumps({"cases": cases}))
    expected = load_file(source / "expected.safetensors")
    save_file({name: change(name, expected[name]).contiguous() for name in names}, folder / "expected.safetensors")
    return folder


def test_another_fixture_of_the_format_passes(preprocess_fixture, tmp_path, capsys):
    names = ["video_short_mp4_0.6s", "imu_npy_400hz_Tx6", "rgbd_room"]
    fixture = derived_fixture(preprocess_fixture, tmp_path, names, lambda name, t: t)
    assert main(["parity-inputs", str(fixture)]) == 0
    assert set(rows(capsys.readouterr().out)) == set(names)


def test_an_error_above_the_tolerance_or_another_shape_is_a_miss(preprocess_fixture, tmp_path, capsys):
    names = ["image_room_jpeg", "imu_csv_100hz", "fmri_npy_15724"]
    changes = {"image_room_jpeg": lambda t: t + 2e-3, "imu_csv_100hz": lambda t: t[:, :200]}
    fixture = derived_fixture(preprocess_fixture, tmp_path, names,
                              lambda name, t: changes.get(name, lambda t: t)(t))
    assert main(["parity-inputs", str(fixture)]) == 1
    table = rows(capsys.readouterr().out)
    assert table["image_room_jpeg"].split()[-2:] == ["2.00e-03", "MISS"]
    assert "(expected 6x200)" in table["imu_csv_100hz"] and table["imu_csv_100hz"].endswith("MISS")
    assert table["fmri_npy_15724"].endswith("ok")


def test_case_options_reach_the_decoder(preprocess_fixture, tmp_path, capsys):
    """The IMU case at 100 Hz read as 200 Hz: the same file, another tensor."""
    fixture = derived_fixture(preprocess_fixture, tmp_path, ["imu_csv_100hz"], lambda name, t: t)
    cases = json.loads((fixture / "cases.json").read_text())
    cases["cases"][0]["options"] = {"imu_sample_rate": 200.0}
    (fixture / "cases.json").write_text(json.dumps(cases))
    assert main(["parity-inputs", str(fixture)]) == 1
    assert rows(capsys.readouterr().out)["imu_csv_100hz"].endswith("MISS")


def test_a_refused_upload_is_a_miss_that_says_why(preprocess_fixture, tmp_path, capsys):
    fixture = derived_fixture(preprocess_fixture, tmp_path, ["audio_wav_8k"], lambda name, t: t)
    cases = json.loads((fixture / "cases.json").read_text())
    cases["cases"][0]["files"] = {"audio": str(preprocess_fixture / "inputs" / "room.jpg")}
    (fixture / "cases.json").write_text(json.dumps(cases))
    assert main(["parity-inputs", str(fixture)]) == 1
    assert "refused: 415" in rows(capsys.readouterr().out)["audio_wav_8k"]


def test_a_folder_that_is_no_fixture_is_refused(tmp_path, capsys):
    assert main(["parity-inputs", str(tmp_path)]) == 2
    assert "missing cases.json, expected.safetensors" in capsys.readouterr().out

