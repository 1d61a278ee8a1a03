"""The whole pipeline against the authors' outputs: `onellm parity` on the shared fixture."""

from server.cli import main


def test_parity_command_matches_reference_for_every_modality(fixture_dir, capsys):
    code = main(["parity", str(fixture_dir), "--clip-heads", "2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split()[:1] and line.split()[0] in
            {"image", "video", "audio", "point", "rgbd", "rgbn", "fmri", "imu"}]
    assert len(rows) == 8, out
    assert all(row.endswith("ok") and "24/24" in row for row in rows), out
    assert code == 0


def test_parity_fails_with_wrong_clip_heads(fixture_dir, fixture_model, capsys):
    """1 CLIP head instead of the fixture's 2 computes another model: parity must say so."""
    code = main(["parity", str(fixture_dir), "--clip-heads", "1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out


def test_parity_refuses_a_folder_that_is_no_fixture(tmp_path, capsys):
    assert main(["parity", str(tmp_path)]) == 2
    assert "reference.json" in capsys.readouterr().out
