from tuneloop.naming import did_you_mean, dotted_keys


def test_did_you_mean_names_the_closest_candidate_or_nothing():
    assert did_you_mean("learning_rat", ["learning_rate", "weight_decay"]) == " (did you mean 'learning_rate'?)"
    assert did_you_mean("zzz", ["learning_rate", "weight_decay"]) == ""


def test_dotted_keys_flattens_sections():
    assert dotted_keys({"optim": {"learning_rate": 5e-05, "weight_decay": 0.0}, "train": {"epochs": 3}}) == {
        "optim.learning_rate": 5e-05, "optim.weight_decay": 0.0, "train.epochs": 3}
