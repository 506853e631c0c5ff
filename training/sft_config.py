"""Settings of a LoRA fine-tuning run: the few that matter, mapped onto TRL's ``SFTConfig`` and peft's ``LoraConfig``.

Field names are those of ``SFTConfig`` and ``LoraConfig``, so a reader of either finds them; everything else keeps
TRL's defaults. On a CPU the base model trains in fp32 (CPU bf16 autocast measured no faster here).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.bounds import check_bounds, within
from runtime.defaults import MAX_STEPS, MOST_SEED, MOST_STEPS
from runtime.errors import ConfigError

if TYPE_CHECKING:
    from peft import LoraConfig
    from trl import SFTConfig


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _training_on_bf16_gpu() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class LoraSFTConfig:
    """What to fine-tune, where to put the adapter, and how hard to train."""

    output_dir: str = field(
        default="runs/lora-adapter",
        metadata={"help": "Folder the adapter is saved to (adapter_config.json, weights, redpen_adapter.json)."},
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Local Hugging Face model folder to adapt [default: the embedded default model]."},
    )
    # 16/32: enough capacity to learn a reply format and a style of feedback from a few hundred rows; alpha = 2r is
    # the usual LoRA scaling, so the learning rate need not change with r.
    # At most 1024: past the largest ranks used in practice (256), and near full fine-tuning of small models' layers.
    r: int = field(default=16, metadata={"help": "LoRA rank.", **within(1, 1024)})
    lora_alpha: int = field(
        default=32,
        metadata={"help": "LoRA scaling numerator (the update is scaled by alpha/r).", **within(1, 4096)},
    )
    lora_dropout: float = field(
        default=0.05,
        metadata={"help": "Dropout on the LoRA input; small data overfits.", **within(0, 1, open_high=True)},
    )
    # The attention projections: where LoRA's original paper put it, and names shared by Llama, Qwen, Mistral, Gemma.
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Names of the linear layers that get a LoRA adapter."},
    )
    # 2e-4: the common LoRA rate (10x full fine-tuning's, since only the small adapter moves).
    learning_rate: float = field(
        default=2e-4, metadata={"help": "Peak learning rate (linear decay to zero).", **within(0, 1, open_low=True)}
    )
    # 4: a replay row is ~300 tokens; 8 rows cost ~45 CPU-seconds a step on the 135M model (measured: fp32, LoRA on
    # q/k/v/o), so 4 rows keep a step near 10 s on 2 free cores. Raise it on a GPU.
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "Rows per optimisation step.", **within(1, 4096)}
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "Batches summed per step; raise it for a larger batch in the same memory.",
            **within(1, 4096),
        },
    )
    max_steps: int = field(
        default=MAX_STEPS,
        metadata={"help": "Optimisation steps to run.", **within(1, MOST_STEPS)},  # why this many: runtime.defaults
    )
    # 768: a gathering prompt (system, question, answer, earlier guidelines) plus its JSON reply fits with room to
    # spare (the smoke run's rows: 218-356 tokens).
    # At most 131,072: the longest context of today's open models.
    max_length: int = field(
        default=768,
        metadata={"help": "Longest tokenized row, in tokens; longer rows are left out.", **within(1, 131_072)},
    )
    # Padding-free: a batch's rows are joined into one sequence whose position ids restart at each row, so no step
    # computes padding (rows are not cut: those past max_length are left out before). Measured by `redpen bench
    # train` (16 BBQ rows, batches of 4, 2 cores): 1.10x tokens/s at the same final loss (0.4352 vs 0.4344).
    padding_free: bool = field(
        default=True, metadata={"help": "Join a batch's rows into one sequence instead of padding them."}
    )
    logging_steps: int = field(
        default=5,
        metadata={"help": "Log the loss every this many steps (and at step 1).", **within(1, MOST_STEPS)},
    )
    # 5: a CPU step of the default model takes ~10 s, so a killed training redoes under a minute; a LoRA checkpoint
    # (adapter, optimizer state) is ~20 MB, written in well under a second.
    save_steps: int = field(
        default=5,
        metadata={
            "help": "Checkpoint every this many steps; a killed training resumes from the last one.",
            **within(1, MOST_STEPS),
        },
    )
    seed: int = field(
        default=42, metadata={"help": "Seed for the LoRA init and the data order.", **within(0, MOST_SEED)}
    )
    use_qlora: bool = field(
        default=False,
        metadata={"help": "Load the base model in 4-bit (QLoRA); needs a CUDA GPU and bitsandbytes."},
    )

    def __post_init__(self) -> None:
        check_bounds(self)
        if not self.target_modules:
            raise ConfigError("target_modules is empty: name the layers to adapt, e.g. q_proj v_proj")
        if not str(self.output_dir).strip():
            raise ConfigError("output_dir is empty: give the folder to save the adapter to")
        if self.base_model is not None and not (Path(self.base_model).expanduser() / "config.json").is_file():
            raise ConfigError(
                f"base_model {self.base_model} has no config.json; give a local Hugging Face model folder, "
                "or leave it unset for the embedded default"
            )
        if self.use_qlora:
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("use_qlora needs a CUDA GPU (4-bit bitsandbytes kernels); on CPU use plain LoRA")
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ConfigError("use_qlora needs bitsandbytes: pip install 'redpen[gpu]'")

    def base_model_dir(self) -> tuple[str, Path]:
        """The base model's id (as the local backend names it) and folder; the default is converted on first use."""
        if self.base_model is None:
            from runtime.models.default_model import DEFAULT_MODEL_NAME, default_model_dir

            return DEFAULT_MODEL_NAME, default_model_dir()
        path = Path(self.base_model).expanduser()
        return path.name, path

    def model_init_kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` arguments: fp32 on CPU, bf16 on a GPU that has it, 4-bit NF4 for QLoRA."""
        import torch

        if not self.use_qlora:
            return {"dtype": torch.bfloat16 if _training_on_bf16_gpu() else torch.float32}
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if _training_on_bf16_gpu() else torch.float16
        # NF4 with double quantisation and bf16 compute: the QLoRA paper's recipe.
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        # 4-bit weights are quantized as they load, onto the GPU; the trainer cannot move them afterwards.
        return {"dtype": compute, "quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}

    def to_sft_config(self, output_dir: str | Path) -> SFTConfig:
        """TRL's training arguments; ``output_dir`` is the trainer's scratch folder, where it checkpoints every
        ``save_steps`` (the last two kept: one is whole while the next is being written) for a killed run to resume.

        The trainer gets prompt-completion rows, so the loss is on the completion (the last assistant reply) only.
        """
        from trl import SFTConfig

        return SFTConfig(
            output_dir=str(output_dir),
            learning_rate=self.learning_rate,
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            max_steps=self.max_steps,
            # TRL does not cut padding-free rows; build_trainer has already left out those past max_length.
            max_length=None if self.padding_free else self.max_length,
            padding_free=self.padding_free,
            logging_steps=self.logging_steps,
            logging_first_step=True,  # a loss is on record even for a run shorter than logging_steps
            seed=self.seed,
            completion_only_loss=True,
            # CPU autocast to bf16 is no faster for training than fp32 here and less exact; GPUs with bf16 use it.
            bf16=_training_on_bf16_gpu(),
            # Recomputing activations saves memory a 4-bit big model needs, and only costs time on a small one.
            activation_checkpointing=self.use_qlora,
            dataloader_pin_memory=_on_gpu(),  # pinned memory only speeds up copies to a GPU
            save_strategy="steps",  # checkpoints to resume from; the adapter itself is saved once, whole, by train_lora
            save_steps=self.save_steps,
            save_total_limit=2,
            report_to="none",
            disable_tqdm=True,  # progress goes to the caller's on_log, not to the terminal
        )

    def to_lora_config(self) -> LoraConfig:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.target_modules),
            task_type="CAUSAL_LM",
        )

    def with_steps(self, max_steps: int | None) -> LoraSFTConfig:
        """This config with ``max_steps`` steps, or unchanged for None (the caller did not choose)."""
        return self if max_steps is None else dataclasses.replace(self, max_steps=max_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
