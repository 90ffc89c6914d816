"""study.json, typed: what the runner writes reads back as it was, and older or foreign files are handled."""
import json

import pytest

from config.records import SUMMARY_FIELDS, ArmRecord, StudyRecord
from config.schema import UsageError


def test_a_study_record_round_trips_through_its_file(tmp_path):
    arm = ArmRecord("topk-1", "topk-k32", "topk", "auxk", ["activations"], d_sae=1024, sparsity="k 32")
    record = StudyRecord("s", ["activations"], 1.5, "running", {"probes": {}}, [arm], setup={"d_in": 128})
    record.arm("topk-1").status, record.arm("topk-1").final = "complete", {"l0": 32.0}
    record.write(tmp_path / "study.json")
    back = StudyRecord.read(tmp_path / "study.json", "--report")
    assert back == record and back.arms[0].status == "complete" and back.arms[0].final == {"l0": 32.0}
    assert list(back.arms[0].summary()) == list(SUMMARY_FIELDS) and back.arms[0].summary()["final"] == {"l0": 32.0}


def test_an_older_record_reads_with_the_fields_it_lacks_empty(tmp_path):
    old = {"study_id": "s", "status": "interrupted", "spec": {"study": {"names": ["frequency"]}},
           "arms": [{"arm_id": "relu-1", "name": "relu", "architecture": "relu", "dead_handling": "none",
                     "status": "interrupted", "steps": 40}]}
    (tmp_path / "study.json").write_text(json.dumps(old))
    record = StudyRecord.read(tmp_path / "study.json", "--resume")
    assert record.studies == ["frequency"] and record.created == 0 and record.summary_runs == {}
    assert record.arms[0].steps == 40 and record.arms[0].d_sae is None and record.arms[0].final == {}


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ('{"study_id": "s"}', "is not a study record of this harness"),
    ('{"study_id": "s", "status": "x", "spec": {}, "arms": [{"name": "no id"}]}', "is not a study record"),
])
def test_a_damaged_or_foreign_file_is_one_line(tmp_path, text, message):
    (tmp_path / "study.json").write_text(text)
    with pytest.raises(UsageError, match=message):
        StudyRecord.read(tmp_path / "study.json", "--report")
