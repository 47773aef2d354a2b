"""`tokenizer_source: union`: models with different vocabularies merged as mergekit 0.1.5 merges them
(embedding rows rebuilt for the union vocabulary), the same YAML run by both."""
import pytest
import torch
from tiny import make_tiny_bert, perturbed_copy
from transformers import AutoTokenizer, BertForSequenceClassification, BertTokenizerFast

from modelmerge.vocabulary import union_tokenizer
from test_mergekit import assert_same, run_both

pytest.importorskip("mergekit.merge")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base and a fine-tune with the base's vocabulary, and a model whose vocabulary has 30 other
    tokens (and lacks 30 of the base's) and 10 more rows."""
    root = tmp_path_factory.mktemp("union")
    base = make_tiny_bert(str(root / "base"), seed=0)
    ft1 = perturbed_copy(base, str(root / "ft1"), seed=1, scale=0.05)
    vocab = AutoTokenizer.from_pretrained(base).get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    other = tokens[:-40] + [f"zz{i}" for i in range(50)]  # 360 shared (specials first), 50 new
    model = BertForSequenceClassification.from_pretrained(base)
    model.resize_token_embeddings(len(other))
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[360:] = torch.randn(50, 32, generator=torch.Generator().manual_seed(5))
    folder = root / "other"
    model.save_pretrained(folder)
    BertTokenizerFast(vocab={token: i for i, token in enumerate(other)}, do_lower_case=True).save_pretrained(folder)
    return {"base": base, "ft1": ft1, "other": str(folder)}


def test_union_vocabulary_starts_from_the_base_and_adds_the_others_tokens(zoo):
    base, other = AutoTokenizer.from_pretrained(zoo["base"]), AutoTokenizer.from_pretrained(zoo["other"])
    union = union_tokenizer((base, 400), [(other, 410)]).get_vocab()
    assert len(union) == 450
    assert all(union[t] == i for t, i in base.get_vocab().items())
    assert sorted(union[f"zz{i}"] for i in range(50)) == list(range(400, 450))


# With no base_model mergekit starts the union from whichever model its set of references yields first,
# which varies between runs, so every configuration here names one.
@pytest.mark.parametrize("method,base_model", [("linear", "@ft1@"), ("task_arithmetic", "@base@"), ("ties", "@base@")])
def test_the_same_yaml_gives_mergekits_tensors(zoo, tmp_path, method, base_model):
    config = {"merge_method": method, "tokenizer_source": "union", "dtype": "float32",
              "models": [{"model": "@ft1@", "parameters": {"weight": 0.6, "density": 0.5}},
                         {"model": "@other@", "parameters": {"weight": 0.4, "density": 0.5}}]}
    if method == "linear":
        for entry in config["models"]:
            entry["parameters"].pop("density")
    config["base_model"] = base_model
    theirs, ours, folder = run_both(tmp_path, config, zoo)
    assert ours["bert.embeddings.word_embeddings.weight"].shape[0] == 450
    # mergekit orders the added tokens as a hash map yields them (it varies between runs): compare by token
    name = "bert.embeddings.word_embeddings.weight"
    their_ids = AutoTokenizer.from_pretrained(tmp_path / "mergekit").get_vocab()
    our_ids = AutoTokenizer.from_pretrained(folder).get_vocab()
    assert their_ids.keys() == our_ids.keys()
    tokens = sorted(our_ids)
    torch.testing.assert_close(ours[name][[our_ids[t] for t in tokens]], theirs[name][[their_ids[t] for t in tokens]],
                               rtol=1e-5, atol=1e-6)
    assert_same({n: t for n, t in theirs.items() if n != name}, {n: t for n, t in ours.items() if n != name})
    assert sorted(our_ids[f"zz{i}"] for i in range(50)) == list(range(400, 450))
    assert BertForSequenceClassification.from_pretrained(folder).config.vocab_size == 450
