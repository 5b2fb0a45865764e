import torch

from shared_model.text import PAD_ID, ReportTokenizer


def test_vocabulary_is_fixed_and_public():
    a, b = ReportTokenizer(512, 32), ReportTokenizer(512, 32)
    reports = ["Heart size is enlarged.", "No pleural effusion. Lungs are clear."]
    assert torch.equal(a.encode(reports)[0], b.encode(reports)[0])
    # Two hospitals never fit anything: encoding one text does not change another's ids.
    a.encode(["a completely different hospital vocabulary xyzzy"] * 10)
    assert torch.equal(a.encode(reports)[0], b.encode(reports)[0])


def test_truncation_padding_and_missing_reports():
    tok = ReportTokenizer(4096, 8)
    ids, present = tok.encode(
        ["The cardiac silhouette is enlarged with a small effusion.", "Clear.", "", "   "]
    )
    assert ids.shape == (4, 8) and ids.dtype == torch.int64
    assert present.tolist() == [True, True, False, False]
    long_row, short_row = ids[0], ids[1]
    assert (long_row != PAD_ID).all()  # truncated to exactly 8
    assert long_row[-1] == short_row[(short_row != PAD_ID).sum() - 1]  # both end in [SEP]
    assert (ids[2] == PAD_ID).all() and (ids[3] == PAD_ID).all()


def test_bucket_ids_stay_in_range():
    tok = ReportTokenizer(64, 16)
    ids, _ = tok.encode(["pneumothorax cardiomegaly atelectasis granuloma " * 5])
    assert ids.min() >= 0 and ids.max() < 64
