"""Make the tiny model, tokenizer and dataset behind configs/tiny-cpu.yaml.

    python configs/tiny/make_tiny_assets.py          # rewrites configs/tiny/{model,data}

The tiny config must train for real, on 2 CPU cores, in well under two minutes, and the
fine-tuned model must visibly differ from the base. So the data is a small closed world
(animals and four facts about each, asked in several phrasings) and the model is a 4-layer
Llama with a byte-level BPE tokenizer trained on that world. Like a real base model, it is
pretrained (here for a few seconds, on plain statements such as "The cat lives in a house.")
and has never seen a question: before fine-tuning it rambles on in statements, after it
answers the question asked — a change a person sees at a glance in samples.jsonl, and a
test loss that falls several-fold.

Everything is seeded, so re-running the script gives the same data and the same weights.
Needs the runner's dependencies (torch, transformers, tokenizers): pip install -e '.[runner]'.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234

# animal -> (sound, home, food, legs)
ANIMALS: dict[str, tuple[str, str, str, int]] = {
    "cat": ("meow", "a house", "fish", 4),
    "dog": ("woof", "a kennel", "bones", 4),
    "cow": ("moo", "a barn", "grass", 4),
    "duck": ("quack", "a pond", "bread", 2),
    "lion": ("roar", "the savanna", "meat", 4),
    "frog": ("croak", "a pond", "flies", 4),
    "owl": ("hoot", "a tree", "mice", 2),
    "horse": ("neigh", "a stable", "hay", 4),
    "sheep": ("baa", "a field", "grass", 4),
    "pig": ("oink", "a sty", "apples", 4),
    "bee": ("buzz", "a hive", "nectar", 6),
    "wolf": ("howl", "a forest", "meat", 4),
    "snake": ("hiss", "the grass", "eggs", 0),
    "mouse": ("squeak", "a hole", "cheese", 4),
    "goat": ("bleat", "a hill", "leaves", 4),
    "crow": ("caw", "a tree", "seeds", 2),
    "hen": ("cluck", "a coop", "corn", 2),
    "bear": ("growl", "a cave", "honey", 4),
    "spider": ("click", "a web", "flies", 8),
    "donkey": ("bray", "a farm", "hay", 4),
    "monkey": ("chatter", "the jungle", "bananas", 2),
    "seal": ("bark", "the sea", "fish", 0),
    "goose": ("honk", "a lake", "grass", 2),
    "tiger": ("roar", "the jungle", "meat", 4),
}

SOUND_QUESTIONS = ["What sound does a {a} make?", "Which noise does the {a} make?", "Tell me the sound of a {a}."]
HOME_QUESTIONS = ["Where does a {a} live?", "Where is the home of a {a}?", "Tell me where the {a} lives."]
FOOD_QUESTIONS = ["What does a {a} eat?", "Which food does the {a} like?", "Tell me what a {a} eats."]
LEGS_QUESTIONS = ["How many legs does a {a} have?", "Count the legs of a {a}.", "Tell me how many legs a {a} has."]


def make_examples() -> list[dict[str, str]]:
    """Every (animal, fact, phrasing) once, plus an 'input'-style phrasing per fact."""
    examples: list[dict[str, str]] = []
    for animal, (sound, home, food, legs) in ANIMALS.items():
        facts = [
            (SOUND_QUESTIONS, "sound", f"A {animal} says {sound}."),
            (HOME_QUESTIONS, "home", f"A {animal} lives in {home}."),
            (FOOD_QUESTIONS, "food", f"A {animal} eats {food}."),
            (LEGS_QUESTIONS, "legs", f"A {animal} has {legs} legs."),
        ]
        for questions, topic, answer in facts:
            for question in questions:
                examples.append({"instruction": question.format(a=animal), "input": "", "output": answer})
            # The Alpaca 'input' field, so the template's input branch is exercised too.
            examples.append({"instruction": f"Describe the {topic} of this animal.", "input": animal, "output": answer})
    random.Random(SEED).shuffle(examples)
    return examples


def make_corpus(n_paragraphs: int = 3000) -> list[str]:
    """Pretraining text: short paragraphs of statements about the animals, never a question."""
    rng = random.Random(SEED + 1)
    paragraphs = []
    for _ in range(n_paragraphs):
        animal = rng.choice(list(ANIMALS))
        sound, home, food, legs = ANIMALS[animal]
        article = rng.choice(["A", "The"])
        facts = [f"{article} {animal} says {sound}.", f"{article} {animal} lives in {home}.",
                 f"{article} {animal} eats {food}.", f"{article} {animal} has {legs} legs."]
        rng.shuffle(facts)
        paragraphs.append(" ".join(facts[: rng.randint(2, 4)]))
    return paragraphs


def write_dataset(examples: list[dict[str, str]]) -> Path:
    path = HERE / "data" / "animals.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for example in examples:
            f.write(json.dumps(example) + "\n")
    return path


def train_tokenizer(examples: list[dict[str, str]], corpus: list[str]):
    """A byte-level BPE (Llama 3 style: no unknown tokens) trained on the dataset's own text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(corpus)
    for e in examples:
        texts += [e["instruction"], e["input"], e["output"]]
    # The runner's prompt template words, so prompts tokenize into few tokens.
    texts += ["### Instruction:\n", "### Input:\n", "### Response:\n", "### System:\n", "### User:\n", "### Assistant:\n"]

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Prepend <s> like Llama tokenizers do, so the runner's BOS handling is exercised.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=256
    )


def make_model(tokenizer, corpus: list[str], out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,  # bitsandbytes on the CPU needs in_features % 64 == 0
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in Llama 3 and Mistral
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    pretrain(model, tokenizer, corpus)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def pretrain(model, tokenizer, corpus: list[str], steps: int = 300, batch: int = 32) -> None:
    """Full-precision next-token training on the statements: the base model's 'knowledge'."""
    import torch

    rng = random.Random(SEED + 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        texts = [p + tokenizer.eos_token for p in rng.sample(corpus, batch)]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"pretrain step {step}: loss {loss.item():.3f}")
    model.eval()


def main() -> None:
    examples = make_examples()
    corpus = make_corpus()
    data_path = write_dataset(examples)
    tokenizer = train_tokenizer(examples, corpus)
    model_dir = HERE / "model"
    make_model(tokenizer, corpus, model_dir)
    print(f"wrote {len(examples)} examples to {data_path} and a {len(tokenizer)}-token model to {model_dir}")


if __name__ == "__main__":
    main()
