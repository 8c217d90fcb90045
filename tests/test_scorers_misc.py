"""LAION aesthetic, BLIP-2 VQA, FID and BERTScore: tiny builders round-trip through the paper loaders."""
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from helpers import agfsync
from helpers.scorers import aesthetic, bertscore, fid, vqa


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _noise_images(count: int, seed: int = 0, size=(40, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


# ------------------------------------------------------------------------------------------------ aesthetic

@pytest.fixture(scope="module")
def aesthetic_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("aesthetic")
    aesthetic.build_tiny_aesthetic(folder, seed=0)
    return folder


def test_tiny_aesthetic_is_deterministic_per_seed(aesthetic_folder, tmp_path):
    facts = aesthetic.build_tiny_aesthetic(tmp_path / "again", seed=0)
    assert facts["embedding_size"] == 32
    for name in (aesthetic.MLP_FILE, "clip/model.safetensors"):
        assert _sha(tmp_path / "again" / name) == _sha(aesthetic_folder / name)
    assert "random" in (aesthetic_folder / "README.md").read_text().lower()


def test_aesthetic_loader_keeps_the_saved_mlp_and_scores_like_a_hand_computation(aesthetic_folder):
    scorer = aesthetic.load_aesthetic(aesthetic_folder)
    saved = torch.load(aesthetic_folder / aesthetic.MLP_FILE, weights_only=True)
    assert set(saved) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    for key, tensor in scorer.mlp.state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    images = _noise_images(3)
    scorer.batch_size = 2
    scores = scorer.score(images, ["ignored"] * 3)
    assert scores.shape == (3,) and np.isfinite(scores).all()
    np.testing.assert_array_equal(scores, scorer.score(images))  # repetition changes nothing
    # batching changes nothing beyond float rounding (a batch of 3 may take other matmul kernels than 2 + 1)
    scorer.batch_size = 32
    np.testing.assert_allclose(scores, scorer.score(images), rtol=1e-6, atol=1e-7)

    with torch.no_grad():  # by hand: CLIP image features, L2 norm, then the five linear layers (no activations)
        pixels = scorer.processor(images=images, return_tensors="pt")["pixel_values"]
        x = scorer.clip.get_image_features(pixel_values=pixels).pooler_output
        x = x / x.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):
            x = x @ saved[f"layers.{i}.weight"].T + saved[f"layers.{i}.bias"]
    np.testing.assert_allclose(scores, x[:, 0].numpy(), rtol=1e-5, atol=1e-6)
    assert scorer.name == "aesthetic" and scorer.weights_id.startswith(f"{aesthetic_folder.name}@")


def test_aesthetic_names_a_missing_mlp_file(aesthetic_folder):
    with pytest.raises(FileNotFoundError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        aesthetic.load_aesthetic(aesthetic_folder / "clip")


# ------------------------------------------------------------------------------------------------------ VQA

@pytest.fixture(scope="module")
def vqa_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vqa")
    vqa.build_tiny_vqa(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def vqa_scorer(vqa_folder):
    return vqa.load_vqa(vqa_folder)


QUESTIONS = ["is there a cat?", "is the sky blue in this picture of a castle at sunset?", "red?"]


def test_tiny_vqa_is_deterministic_and_inserts_image_tokens(vqa_folder, vqa_scorer, tmp_path):
    facts = vqa.build_tiny_vqa(tmp_path / "again", seed=0)
    assert _sha(tmp_path / "again" / "model.safetensors") == _sha(vqa_folder / "model.safetensors")
    assert "random" in (vqa_folder / "README.md").read_text().lower()
    model, processor = vqa_scorer.model, vqa_scorer.processor
    ids = processor(images=_noise_images(1), text=["Question: red? Answer:"], return_tensors="pt")["input_ids"][0]
    assert (ids == model.config.image_token_index).sum() == facts["num_query_tokens"] == model.config.num_query_tokens


def test_tiny_vqa_answers_turn_on_the_picture(vqa_folder, vqa_scorer):
    # pictures it was not calibrated on (another seed), and other questions: about half yes, not the same for all
    styles = vqa.calibration_styles(seed=7, per_style=4)
    pictures = [picture for style in styles for picture in style]
    questions = ["is there a cat?", "is the castle red?", "are there two boats on the lake?", "is it raining?"]
    p = np.stack([vqa_scorer.yes_probability(pictures, [q] * len(pictures)) for q in questions])  # (question, picture)
    assert 0.2 < (p > 0.5).mean() < 0.8
    scores = [agfsync.vqa_score(p[:, i]) for i in range(len(pictures))]
    assert len(set(scores)) >= 3  # AGFSync's VQA score tells pictures apart
    card = (vqa_folder / "README.md").read_text()
    assert "about half the answers are yes" in card


def test_vqa_yes_probability_is_a_batched_deterministic_probability(vqa_scorer):
    images = _noise_images(3)
    probability = vqa_scorer.yes_probability(images, QUESTIONS)
    assert probability.shape == (3,) and ((probability >= 0) & (probability <= 1)).all()
    np.testing.assert_array_equal(probability, vqa_scorer.yes_probability(images, QUESTIONS))
    one_by_one = [vqa_scorer.yes_probability([image], [q])[0] for image, q in zip(images, QUESTIONS)]
    np.testing.assert_allclose(probability, one_by_one, atol=1e-5)  # padding does not change an answer
    answers = vqa_scorer.answers(images, QUESTIONS)
    assert answers == [bool(p > 0.5) for p in probability] and all(type(a) is bool for a in answers)
    assert vqa_scorer.name == "vqa" and "@" in vqa_scorer.weights_id
    with pytest.raises(ValueError, match="one image per question"):
        vqa_scorer.yes_probability(images, QUESTIONS[:2])


def test_vqa_sends_an_image_shared_by_several_questions_through_the_vision_tower_once(vqa_scorer):
    first, second = _noise_images(2, seed=4)
    questions = QUESTIONS + ["a dog?", "is it night?"]
    encoded = []
    hook = vqa_scorer.model.vision_model.register_forward_hook(
        lambda module, args, kwargs, output: encoded.append(output.last_hidden_state.shape[0]), with_kwargs=True)
    try:
        shared = vqa_scorer.yes_probability([first] * 3 + [second] * 2, questions)
        copies = vqa_scorer.yes_probability([first.copy() for _ in range(3)] + [second.copy() for _ in range(2)],
                                            questions)
    finally:
        hook.remove()
    assert encoded == [2, 5]  # the same objects: two encodings; five copies: five
    np.testing.assert_allclose(shared, copies, atol=1e-6)


def test_vqa_score_is_100_times_the_share_of_yes(vqa_scorer, monkeypatch):
    image, seen = _noise_images(1)[0], {}

    def fake_yes_probability(images, questions):
        seen["images"], seen["questions"] = images, questions
        return np.array([0.9, 0.2, 0.7, 0.5])  # yes, no, yes, no (0.5 is not a yes)

    monkeypatch.setattr(vqa_scorer, "yes_probability", fake_yes_probability)
    assert vqa_scorer.vqa_score(image, ["a?", "b?", "c?", "d?"]) == 50.0
    assert seen["images"] == [image] * 4 and seen["questions"] == ["a?", "b?", "c?", "d?"]
    with pytest.raises(ValueError, match="at least one question"):
        vqa_scorer.vqa_score(image, [])


def test_answer_tokens_drop_the_space_both_words_start_with(vqa_scorer):
    tokenizer = vqa_scorer.processor.tokenizer
    # the tiny byte BPE has no whole-word "yes": " yes" starts with "Ġ" like " no", so only "y" vs "n" is left
    assert tokenizer.convert_ids_to_tokens(vqa_scorer.yes_ids) == ["y"]
    assert tokenizer.convert_ids_to_tokens(vqa_scorer.no_ids) == ["n"]
    tokenizer.padding_side = "right"  # as OPT's tokenizer ships
    assert vqa.VqaScorer(vqa_scorer.model, vqa_scorer.processor, "x").processor.tokenizer.padding_side == "left"


def _build_tiny_t5_blip2(folder: Path) -> None:
    """BLIP-2 with an encoder-decoder (T5) text model and a sentencepiece-style ("▁yes") tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil,
                              PreTrainedTokenizerFast)

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    corpus = ["question answer is there a cat dog red blue sky the in picture of castle sunset", "yes no"] * 20
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, show_progress=False,
                                                            special_tokens=["<pad>", "</s>", "<unk>"]))
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, num_query_tokens=4)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = Blip2Config(vision_config=dict(image_size=32, patch_size=8, **small),
                         qformer_config=dict(vocab_size=len(tokenizer), **small),
                         text_config=dict(model_type="t5", vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64,
                                          num_layers=1, num_decoder_layers=1, num_heads=4, pad_token_id=0,
                                          eos_token_id=1, decoder_start_token_id=0),
                         num_query_tokens=4, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


def test_vqa_works_with_an_encoder_decoder_text_model_like_flan_t5(tmp_path):
    _build_tiny_t5_blip2(tmp_path)
    scorer = vqa.load_vqa(tmp_path)
    assert scorer.model.config.is_encoder_decoder
    tokenizer = scorer.processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(scorer.yes_ids) == ["▁yes"]
    assert tokenizer.convert_ids_to_tokens(scorer.no_ids) == ["▁no"]
    images = _noise_images(3)
    probability = scorer.yes_probability(images, QUESTIONS)
    assert probability.shape == (3,) and ((probability >= 0) & (probability <= 1)).all()
    one_by_one = [scorer.yes_probability([image], [q])[0] for image, q in zip(images, QUESTIONS)]
    np.testing.assert_allclose(probability, one_by_one, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ FID

def _frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Independent oracle: ‖μ₁−μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½) with scipy's matrix square root."""
    mu1, mu2 = real.mean(0), fake.mean(0)
    sigma1, sigma2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * root))


def test_fid_on_clip_features_is_zero_for_equal_sets_and_grows_with_a_shift(aesthetic_folder):
    clip = aesthetic_folder / "clip"
    real = _noise_images(8, seed=1)
    brightened = [Image.fromarray((np.asarray(image) // 4 + 180).astype(np.uint8)) for image in real]
    same = fid.fid_score(real, real, feature=clip, batch_size=3)
    half = fid.fid_score(real, real[4:] + brightened[:4], feature=clip)
    shifted = fid.fid_score(real, brightened, feature=clip)
    assert abs(same) < 1e-4 and 0 < half < shifted


def test_fid_matches_an_independent_frechet_distance(aesthetic_folder):
    real, fake = _noise_images(6, seed=2), _noise_images(5, seed=3, size=(30, 30))
    extractor = fid.ClipFeatureExtractor(aesthetic_folder / "clip")
    assert extractor.num_features == 32
    features = [extractor(fid.as_uint8(images, 299)).double().numpy() for images in (real, fake)]
    assert features[0].shape == (6, 32)
    expected = _frechet_distance(*features)
    assert math.isclose(fid.fid_score(real, fake, feature=aesthetic_folder / "clip"), expected, rel_tol=1e-3)


def test_fid_from_features_equals_torchmetrics_and_each_keyed_image_is_embedded_once(aesthetic_folder):
    from torchmetrics.image.fid import FrechetInceptionDistance

    clip = aesthetic_folder / "clip"
    real, fake = _noise_images(6, seed=4), _noise_images(5, seed=5)
    metric = FrechetInceptionDistance(feature=fid.ClipFeatureExtractor(clip))  # torchmetrics end to end
    metric.update(fid.as_uint8(real, 64), real=True)
    metric.update(fid.as_uint8(fake, 64), real=False)
    features = fid.FidFeatures(clip, image_size=64, batch_size=4)
    embedded = []
    extractor = features.extractor
    features.extractor = lambda batch: (embedded.append(len(batch)), extractor(batch))[1]
    real_rows = features(real, keys=[f"r{i}" for i in range(6)])
    fake_rows = features(fake + real[:2], keys=[f"f{i}" for i in range(5)] + ["r0", "r1"])  # two seen before
    assert sum(embedded) == 11 and fake_rows.shape == (7, 32) and fake_rows.dtype == np.float64
    np.testing.assert_array_equal(fake_rows[5:], real_rows[:2])
    assert math.isclose(fid.frechet_distance(real_rows, fake_rows[:5]), float(metric.compute()), rel_tol=1e-5)
    with pytest.raises(ValueError, match="at least 2 images per set.*1 generated_images"):
        fid.frechet_distance(real_rows, fake_rows[:1])
    with pytest.raises(ValueError, match="one key per image"):
        features(real, keys=["r0"])
    twice = features([fake[0], fake[0]], keys=["d", "d"])  # one key twice in a call: embedded once
    assert sum(embedded) == 12 and np.array_equal(twice[0], twice[1])
    # `add` fills the rows and hands none back; without keys every image is embedded, known or not
    assert features.add(fake[:3] + [fake[4]], keys=["f0", "g1", "g1", "g2"]) is None and sum(embedded) == 14
    np.testing.assert_allclose(features.rows(["g1", "g2", "f0"]), features(fake[1:2] + [fake[4], fake[0]]), rtol=1e-5,
                               atol=1e-6)  # batches of other images: float32 sums in another order
    assert sum(embedded) == 17
    # no size given: the network's own input side (this CLIP's 64 px; Inception's 299), named in the store's folder
    own = fid.FidFeatures(clip, image_size=None)
    assert own.image_size == 64 and own.features_id.endswith("-64px") and own.features_id.startswith("clip-clip@")


def test_feature_moments_equal_a_hand_worked_covariance_in_any_chunking():
    rows = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    moments = fid.FeatureMoments.of(rows, chunk=2)
    assert moments.count == len(moments) == 3
    np.testing.assert_array_equal(moments.total, [2, 2])
    np.testing.assert_array_equal(moments.outer, [[4, 0], [0, 4]])
    mean, covariance = moments.mean_and_covariance()
    # mean (2/3, 2/3); covariance ((Σxxᵀ − 3 μμᵀ) / 2) = [[4/3, −2/3], [−2/3, 4/3]], as np.cov gives
    np.testing.assert_allclose(mean.numpy(), [2 / 3, 2 / 3])
    np.testing.assert_allclose(covariance.numpy(), [[4 / 3, -2 / 3], [-2 / 3, 4 / 3]])
    np.testing.assert_allclose(covariance.numpy(), np.cov(rows, rowvar=False))

    generator = np.random.default_rng(0)
    real, fake = generator.normal(size=(50, 6)), generator.normal(1.0, 2.0, size=(37, 6)).astype(np.float32)
    whole = _frechet_distance(real, fake.astype(np.float64))
    for chunk in (1, 7, 4096):  # arrays, and iterables of rows, a chunk at a time
        assert math.isclose(fid.frechet_distance(fid.FeatureMoments.of(iter(real), chunk),
                                                 fid.FeatureMoments.of(fake, chunk)), whole, rel_tol=1e-9)
    halves = fid.FeatureMoments.of(fake[:20]) + fid.FeatureMoments.of(list(fake[20:]))
    assert halves.count == 37 and math.isclose(fid.frechet_distance(real, halves), whole, rel_tol=1e-9)
    empty = fid.FeatureMoments.of([])
    assert len(empty) == 0 and (empty + halves).count == 37 and (halves + empty) is not halves
    with pytest.raises(ValueError, match="at least 2 images per set.*0 real_images"):
        fid.frechet_distance(empty, halves)
    with pytest.raises(ValueError, match="rows of 6 features, got an array of shape \\(2, 3\\)"):
        halves.add(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="moments of 6 and of 2 features"):
        halves + moments

    # a set less some of its rows: (0,0), (2,0), (0,2) without (0,2) is Σx = (2,0), Σxxᵀ = [[4,0],[0,0]]
    left = moments - fid.FeatureMoments.of(rows[2:])
    assert left.count == 2 and left is not moments and moments.count == 3  # a new object; the set is unchanged
    np.testing.assert_array_equal(left.total, [2, 0])
    np.testing.assert_array_equal(left.outer, [[4, 0], [0, 0]])
    np.testing.assert_array_equal(moments.total, [2, 2])
    assert (moments - empty).count == 3 and (moments - empty).total is not moments.total
    first = fid.FeatureMoments.of(fake[:20])
    assert math.isclose(fid.frechet_distance(real, halves - first + first), whole, rel_tol=1e-9)
    assert math.isclose(fid.frechet_distance(real, fid.FeatureMoments.of(fake[20:])), fid.frechet_distance(
        real, halves - first), rel_tol=1e-9)
    with pytest.raises(ValueError, match="cannot take 37 rows of 6 features out of 3 rows of 2"):
        moments - halves
    with pytest.raises(ValueError, match="cannot take 3 rows of 2 features out of 37 rows of 6"):
        halves - moments


def test_root_trace_equals_hand_worked_values_on_either_path(monkeypatch):
    def root_trace(a, b) -> float:
        return float(fid.root_trace(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)))

    general = torch.linalg.eigvals
    # positive definite: the symmetric path; the general eigenvalue solver must not be reached
    monkeypatch.setattr(torch.linalg, "eigvals", lambda *a, **k: pytest.fail("took the general eigenvalues"))
    assert math.isclose(root_trace([[4, 0], [0, 9]], [[1, 0], [0, 4]]), 2 + 6)  # eig(Σ₁Σ₂) = 4, 36
    assert math.isclose(root_trace([[2, 1], [1, 2]], [[1, 0], [0, 1]]), 1 + math.sqrt(3))  # eig(Σ₁) = 1, 3
    assert math.isclose(root_trace([[1, 0], [0, 0]], [[4, 0], [0, 9]]), 2)  # Σ₁ singular: Σ₂ is factored
    generator = np.random.default_rng(3)
    a, b = (np.cov(generator.normal(size=(40, 8)) @ generator.normal(size=(8, 8)), rowvar=False) for _ in range(2))
    symmetric = root_trace(a, b)
    monkeypatch.setattr(torch.linalg, "eigvals", general)
    assert math.isclose(symmetric, float(general(torch.tensor(a @ b)).sqrt().real.sum()), rel_tol=1e-10)
    # both singular (fewer images than features): the general eigenvalues of Σ₁Σ₂, as torchmetrics takes them
    assert math.isclose(root_trace([[1, 0], [0, 0]], [[1, 0], [0, 0]]), 1)  # eig = 1, 0
    low = [np.cov(generator.normal(size=(5, 8)), rowvar=False) for _ in range(2)]
    assert math.isclose(root_trace(*low), float(scipy.linalg.sqrtm(low[0] @ low[1]).real.trace()), rel_tol=1e-6)


def test_fid_features_moments_read_the_rows_a_chunk_at_a_time(aesthetic_folder):
    features = fid.FidFeatures(aesthetic_folder / "clip", image_size=32)
    images = _noise_images(7, seed=11)
    keys = [f"k{i}" for i in range(7)]
    rows = features(images, keys=keys)
    for chunk in (1, 3, 4096):
        moments = features.moments(keys, chunk)
        assert moments.count == 7
        np.testing.assert_allclose(moments.total, rows.sum(0), rtol=1e-12)
        np.testing.assert_allclose(moments.outer, rows.T @ rows, rtol=1e-12, atol=1e-12)
    assert math.isclose(fid.frechet_distance(features.moments(keys[:4], 2), features.moments(keys[4:], 2)),
                        fid.frechet_distance(rows[:4], rows[4:]), rel_tol=1e-9)
    with pytest.raises(KeyError, match="no FID features for 1 image.*'nope'.*embed them first"):
        features.moments(["k0", "nope"])


def test_fid_errors_name_the_fix(aesthetic_folder):
    with pytest.raises(ValueError, match="at least 2 images per set.*1 generated_images"):
        fid.fid_score(_noise_images(3), _noise_images(1), feature=aesthetic_folder / "clip")
    with pytest.raises(TypeError, match="uint8"):
        fid.ClipFeatureExtractor(aesthetic_folder / "clip")(torch.rand(2, 3, 32, 32))
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
            fid.fid_score(_noise_images(2), _noise_images(2))


# ------------------------------------------------------------------------------------------------ BERTScore

def test_greedy_match_on_a_hand_worked_example():
    candidate = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    reference = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # not unit length: cosine normalises
    # cosines: row 0 → (1, 0), row 1 → (0, 1), row 2 → (1/√2, 1/√2)
    precision, recall, f1 = bertscore.greedy_match(candidate, reference)
    assert precision == pytest.approx((2 + 1 / math.sqrt(2)) / 3)  # row maxima 1, 1, 1/√2
    assert recall == pytest.approx(1.0)  # column maxima 1, 1
    assert f1 == pytest.approx(2 * precision / (precision + 1))
    # a token that does not count (as [CLS]/[SEP]) can still be matched but is not averaged over
    assert bertscore.greedy_match(candidate, reference, torch.tensor([True, True, False]))[0] == pytest.approx(1.0)
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    assert bertscore.greedy_match(*two) == pytest.approx((1 / math.sqrt(2),) * 3)  # every maximum is 1/√2
    assert bertscore.greedy_match(torch.zeros(0, 2), reference) == (0.0, 0.0, 0.0)
    assert bertscore.f1(0.0, 0.0) == 0.0


@pytest.fixture(scope="module")
def bert_scorer():
    return bertscore.BertScorer()


CANDIDATES = ["a cat sits on a mat", "a photo of a red sports car at sunset, highly detailed", "hello world"]
REFERENCES = ["a cat is on the mat", "an oil painting of a dragon", "goodbye moon"]


def test_bertscore_identical_paraphrase_and_unrelated(bert_scorer):
    same = bert_scorer.score(CANDIDATES, CANDIDATES)
    for key in ("precision", "recall", "f1"):
        np.testing.assert_allclose(same[key], 1.0, atol=1e-5)
    paraphrase = bert_scorer.score(["a photo of a cat sleeping on a sofa"], ["a picture of a cat asleep on a couch"])
    unrelated = bert_scorer.score(["a photo of a cat sleeping on a sofa"], ["the stock market fell sharply today"])
    assert paraphrase["f1"][0] > unrelated["f1"][0] + 0.2
    strict = bertscore.BertScorer(match_special_tokens=False).score(CANDIDATES, REFERENCES)
    default = bert_scorer.score(CANDIDATES, REFERENCES)
    assert (strict["recall"] <= default["recall"] + 1e-6).all()  # fewer match targets never raise a maximum


def test_pairwise_f1_equals_scoring_every_pair(bert_scorer):
    texts = [*CANDIDATES, *REFERENCES, ""]
    matrix = bert_scorer.pairwise_f1(texts, batch_size=4)
    assert matrix.shape == (7, 7)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(matrix)[:6], 1.0, atol=1e-5)
    assert (matrix[6] == 0).all()  # the empty text matches nothing
    pairs = bert_scorer.score([a for a in texts for _ in texts], [b for _ in texts for b in texts])
    np.testing.assert_allclose(matrix, pairs["f1"].reshape(7, 7), atol=1e-5)


def test_bertscore_matches_the_bert_score_package(bert_scorer):
    bert_score = pytest.importorskip("bert_score")
    from helpers.models import minilm_path

    for num_layers, scorer in ((6, bert_scorer), (3, bertscore.BertScorer(num_layers=3))):
        expected = bert_score.score(CANDIDATES, REFERENCES, model_type=str(minilm_path()), num_layers=num_layers)
        ours = scorer.score(CANDIDATES, REFERENCES)
        for key, column in zip(("precision", "recall", "f1"), expected):
            np.testing.assert_allclose(ours[key], column.numpy(), atol=1e-5, err_msg=f"{key}, layer {num_layers}")


def test_bertscore_rejects_a_layer_the_model_lacks():
    with pytest.raises(ValueError, match="num_layers=7 .* layers 1..6"):
        bertscore.BertScorer(num_layers=7)


@pytest.fixture(scope="module")
def t5_vqa_scorer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqa_t5")
    vqa.build_tiny_vqa(folder, seed=1, text_model="t5")  # encoder-decoder, as the paper's Flan-T5 BLIP-2
    return vqa.load_vqa(folder)


CHOICES = [["yes", "no"], ["red", "dark blue", "green"], ["one", "two", "three", "four"]]


def _reference_choice_scores(scorer, image, question, choices):
    """One unbatched forward of the whole model per choice: mean log-probability of the choice's tokens."""
    import torch

    model, processor, tokenizer = scorer.model, scorer.processor, scorer.processor.tokenizer
    prompt = vqa.PROMPT.format(question=question)
    scores = []
    with torch.no_grad():
        for choice in choices:
            if model.config.is_encoder_decoder:
                inputs = processor(images=[image], text=[prompt], return_tensors="pt")
                labels = tokenizer([choice], return_tensors="pt")["input_ids"]
                logits = model(**inputs, labels=labels).logits[0]
                targets = labels[0]
            else:
                inputs = processor(images=[image], text=[f"{prompt} {choice}"], return_tensors="pt")
                n = len(tokenizer(f"{prompt} {choice}")["input_ids"]) - len(tokenizer(prompt)["input_ids"])
                logits = model(**inputs).logits[0, -n - 1:-1]
                targets = inputs["input_ids"][0, -n:]
            scores.append(logits.float().log_softmax(-1).gather(-1, targets[:, None]).mean().item())
    return np.array(scores)


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_choice_scores_equal_one_forward_per_choice_and_choose_takes_the_best(which, vqa_scorer, t5_vqa_scorer,
                                                                             monkeypatch):
    scorer = vqa_scorer if which == "llama" else t5_vqa_scorer
    assert scorer.model.config.is_encoder_decoder == (which == "t5")
    images = _noise_images(3, seed=2)
    encoded_rows = []
    # each question's prompt is read once, not once per choice: T5's encoder, or the decoder-only model's prefix pass
    # (then one pass over the 9 choices from the cached keys and values)
    reader = scorer.model.language_model.get_encoder() if which == "t5" else scorer.model.language_model
    hook = reader.register_forward_hook(lambda module, args, kwargs, out: encoded_rows.append(
        (out.last_hidden_state if which == "t5" else out.logits).shape[0]), with_kwargs=True)
    batched = scorer.choice_log_likelihoods(images, QUESTIONS, CHOICES)  # 9 (image, question, choice) rows at once
    hook.remove()
    assert encoded_rows == ([3] if which == "t5" else [3, 9])
    if which == "llama":  # a question whose choice does not extend the prompt's tokens runs whole; same scores
        continuation = scorer._continuation
        monkeypatch.setattr(scorer, "_continuation", lambda ids, prompt, choice:
                            None if choice == "dark blue" else continuation(ids, prompt, choice))
        whole_rows, run_whole = [], scorer._choice_scores_whole
        monkeypatch.setattr(scorer, "_choice_scores_whole", lambda flat: (whole_rows.append(len(flat)),
                                                                          run_whole(flat))[1])
        mixed = scorer.choice_log_likelihoods(images, QUESTIONS, CHOICES)
        assert whole_rows == [3]  # the question with "dark blue" ran whole, its three choices together
        for scores, expected in zip(mixed, batched):
            np.testing.assert_allclose(scores, expected, rtol=1e-4)  # other padding widths
    assert [len(s) for s in batched] == [2, 3, 4]
    for image, question, options, scores in zip(images, QUESTIONS, CHOICES, batched):
        np.testing.assert_allclose(scores, _reference_choice_scores(scorer, image, question, options), rtol=1e-4)
        assert (scores < 0).all()  # log-probabilities of real tokens
    chosen = scorer.choose(images, QUESTIONS, CHOICES)
    assert chosen == [options[int(np.argmax(s))] for options, s in zip(CHOICES, batched)]
    # yes/no answers on both kinds of text model: batched (padded) equals one at a time
    one_by_one = [scorer.yes_probability([image], [q])[0] for image, q in zip(images, QUESTIONS)]
    np.testing.assert_allclose(scorer.yes_probability(images, QUESTIONS), one_by_one, atol=1e-5)
    with pytest.raises(ValueError, match="at least one choice"):
        scorer.choice_log_likelihoods(images[:1], QUESTIONS[:1], [[]])
    with pytest.raises(ValueError, match="one of each per question"):
        scorer.choice_log_likelihoods(images, QUESTIONS, CHOICES[:2])


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_free_form_answers_are_the_models_own_beam_search_answers_to_tifas_prompt(which, vqa_scorer, t5_vqa_scorer):
    import torch

    scorer = vqa_scorer if which == "llama" else t5_vqa_scorer
    images = _noise_images(3, seed=4)
    batched = scorer.free_form_answers(images, QUESTIONS, CHOICES)  # padded together
    tokenizer = scorer.processor.tokenizer
    for image, question, options, answer in zip(images, QUESTIONS, CHOICES, batched):
        prompt = f"Answer the multiple-choice question. Question: {question} Choices: {', '.join(options)} Answer:"
        inputs = scorer.processor(images=[image], text=[prompt], return_tensors="pt")
        with torch.no_grad():  # the whole model's own generate, one question at a time, unpadded
            out = scorer.model.generate(**inputs, max_new_tokens=30, num_beams=5, do_sample=False)
        new = out[0] if which == "t5" else out[0, inputs["input_ids"].shape[1]:]  # decoder-only repeats the prompt
        assert answer == tokenizer.decode(new, skip_special_tokens=True).strip()
        assert "Question:" not in answer
    free = scorer.free_form_answers(images[:1], QUESTIONS[:1])  # no choices: TIFA's plain question prompt
    assert isinstance(free[0], str)
    assert scorer.free_form_answers([], []) == []
    with pytest.raises(ValueError, match="one image .and choice list. per question"):
        scorer.free_form_answers(images, QUESTIONS, CHOICES[:2])


def test_a_model_loaded_on_use_loads_once_and_only_when_used():
    from helpers.scorers.base import LoadedOnUse

    loads = []
    lazy = LoadedOnUse(lambda: loads.append(1) or {"answer": 42}, "weights@1")
    assert lazy.weights_id == "weights@1" and not lazy.loaded and not loads  # the id needs no load
    with pytest.raises(AttributeError):
        lazy._private  # noqa: B018 - private look-ups (copy, pickle) never load
    assert not loads
    assert lazy.get("answer") == 42 and lazy.get("other") is None
    assert loads == [1] and lazy.loaded  # loaded on first use, once


def test_blip2_answers_in_the_runs_bf16_but_never_in_fp16():
    from helpers.scorers.vqa import vqa_dtype

    # bf16 as the run and the VQA benchmark; Flan-T5 overflows in fp16 (older GPUs' dtype), so fp32 there
    assert [vqa_dtype(d) for d in (torch.bfloat16, torch.float16, torch.float32)] == \
        [torch.bfloat16, torch.float32, torch.float32]
