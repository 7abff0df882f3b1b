"""The jitted training step: full PerceptionDLM forward (vision, RoI replay, structured mask), the
diffusion loss, gradient accumulation, AdamW — sharded over a (data, fsdp, tensor) mesh.

Train state is a plain dict of arrays (`params` = trainable float32 master weights, `frozen`, `opt`,
`step`) so that Orbax, optax and the sharding rules see ordinary pytrees. With LoRA (`lora.rank > 0`),
`params` holds only the adapters (pdlm_jax.lora), `frozen` every base weight as `lora.base` says (the compute
dtype by default; int8 / int4 kernels for QLoRA), and the optimizer state covers the adapters alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdlm_jax import lora as lora_lib
from pdlm_jax import sharding as shd
from pdlm_jax import trees
from pdlm_jax.config import DTYPES, PDLMConfig
from pdlm_jax.qwix_tracing import under
from pdlm_jax.errors import PDLMError
from pdlm_jax.modeling.layout import param_shardings, param_specs
from pdlm_jax.modeling.pdm import PerceptionDLM
from train.config import VISION_POS_EMBED_INITS
from train.samples import TrainBatch
from train.loss import IGNORE, draw_noise, lm_diffusion_loss, packed_layout


def build_model(cfg: PDLMConfig, dtype: str, seed: int = 0, abstract: bool = False, remat: bool = False,
                lora: lora_lib.LoraConfig | None = None, attention: str = "xla"):
    """A PerceptionDLM with float32 parameters computing in `dtype` (concrete or nnx.eval_shape), with
    LoRA adapters when `lora` is enabled, the LM's `attention` kernel (pdlm_jax.ops.attention) and per-layer
    rematerialisation in the backward pass when `remat`."""
    def make():
        model = PerceptionDLM(cfg, dtype=DTYPES[dtype], param_dtype=jnp.float32, rngs=nnx.Rngs(seed),
                              attention_implementation=attention, remat=remat)
        return lora_lib.add_adapters(model, lora, seed) if lora and lora.enabled else model

    return nnx.eval_shape(make) if abstract else make()


def split_params(params: dict, freeze: tuple[str, ...]) -> tuple[dict, dict]:
    """(trainable, frozen) by top-level module group."""
    return ({k: v for k, v in params.items() if k not in freeze}, {k: v for k, v in params.items() if k in freeze})


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup (warmup_ratio of the run) then cosine decay, after global-norm clipping."""
    warmup = math.ceil(optim.warmup_ratio * total_steps)
    schedule = optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, max(total_steps, warmup + 1),
                                                  end_value=optim.lr * optim.end_lr_ratio)
    tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm),
                     optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay))
    return tx, schedule


# ---- forward ----------------------------------------------------------------------------------------


def batch_loss(model: PerceptionDLM, batch: TrainBatch, key: jax.Array, mask_id: int, noise_t_min: float = 0.0,
               mesh: Mesh | None = None, packed: bool = False):
    """(loss, number of masked answer tokens) of one batch; `key` draws the noise. `packed`: the batch holds
    packed Base samples (data.synthetic_questions > 1, train.loss.packed_layout)."""
    embeds = model.embed_inputs(batch.inputs, training=True, mesh=mesh)
    allowed = batch.inputs.attention_mask()
    layout = packed_layout(batch.inputs.block_id) if packed else None
    t, u = draw_noise(key, batch.labels.shape, noise_t_min, layout[0] if packed else None)
    return lm_diffusion_loss(model.lm, embeds, batch.labels, allowed, t, u, mask_id, batch.answer_positions, layout)


# ---- the step -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trainer:
    """Holds the compiled step and the shardings of state and batches."""

    graphdef: Any
    cfg: PDLMConfig
    mesh: Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mask_id: int
    grad_accum: int
    seed: int
    noise_t_min: float = 0.0
    lora: lora_lib.LoraConfig = lora_lib.LoraConfig()
    adapter_shapes: dict = dataclasses.field(default_factory=dict)  # {path: shape} of the LoRA adapters
    quantized_paths: tuple = ()  # the linear layers whose kernels a quantized LoRA base holds as int8 / int4
    compute_dtype: Any = jnp.float32
    attention: str = "xla"  # the LM's attention kernel (build_model)
    # {path: PartitionSpec} of every parameter of the model as trained (with its adapters, its quantized base),
    # from the logical axes each one carries (layout.param_specs)
    model_specs: dict = dataclasses.field(default_factory=dict)
    packed: bool = False  # batches of packed Base samples (data.synthetic_questions > 1)
    state_shardings: Any = None
    _step: Callable | None = None

    def __post_init__(self):
        # the LoRA forward: qwix adds each adapter's term to its layer's dot_general while the step is traced
        self._adapted = (under(lora_lib.provider(self.lora, self.quantized_paths)) if self.lora.enabled
                         else None)

    def _new_state(self, params: dict, freeze: tuple[str, ...]) -> dict:
        if self.lora.enabled:  # train the adapters; every base weight stays fixed, stored as lora.base says
            trainable = lora_lib.init_adapters(self.adapter_shapes, self.lora, self.seed)
            frozen = lora_lib.store_base(params, self.lora, self.compute_dtype, self.quantized_paths)
        else:  # frozen modules are only read: held in the compute dtype, with no optimizer state
            trainable, frozen = split_params(params, freeze)
            frozen = jax.tree.map(lambda x: x.astype(self.compute_dtype), frozen)
        return {"params": trainable, "frozen": frozen, "opt": self.tx.init(trainable), "step": jnp.zeros((), jnp.int32)}

    def state_specs(self, abstract: dict) -> dict:
        """PartitionSpecs of a train state: each parameter's (and adapter's) own, its optimizer moments the same
        as their parameter's, the scalars (step, optimizer counts) replicated."""
        def model_specs(tree: dict) -> dict:
            missing = [p for p in trees.flatten(tree) if p not in self.model_specs]
            if missing:
                raise PDLMError(f"train state leaves {missing[:3]} are no variables of the model: no logical axes")
            return trees.nest({p: self.model_specs[p] for p in trees.flatten(tree)})

        params = model_specs(abstract["params"])
        opt = optax.tree_map_params(self.tx, lambda _, spec: spec, abstract["opt"], params,
                                    transform_non_params=lambda _: PartitionSpec())
        return {"params": params, "frozen": model_specs(abstract["frozen"]), "opt": opt, "step": PartitionSpec()}

    def abstract_state(self, params_shape: dict, freeze: tuple[str, ...]) -> dict:
        """ShapeDtypeStructs (with shardings) of the train state; also fixes `state_shardings`."""
        abstract = jax.eval_shape(functools.partial(self._new_state, freeze=tuple(freeze)), params_shape)
        self.state_shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.state_specs(abstract))
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            self.state_shardings)

    def init_state(self, params: dict, freeze: tuple[str, ...]) -> dict:
        """Train state from a full param tree (the base model with LoRA), placed into the state shardings."""
        self.abstract_state(params, freeze)
        new_state = functools.partial(self._new_state, freeze=tuple(freeze))
        return jax.jit(new_state, out_shardings=self.state_shardings)(params)

    def checkpointed(self, state: dict) -> dict:
        """The part of the train state a checkpoint holds: all of it, or with LoRA everything but the frozen
        base weights (they are reloaded from model.init_from / the seed on resume)."""
        return {k: v for k, v in state.items() if not (self.lora.enabled and k == "frozen")}

    @property
    def rounds_base(self) -> bool:
        """Whether the LoRA run holds its frozen base below float32 (bf16, int8, int4): the export then merges
        the adapters into the float base, not into the rounded copy (`model_params(float_base=...)`)."""
        return self.lora.enabled and (self.lora.quantized_base is not None
                                      or self.lora.base_float_dtype(self.compute_dtype) != jnp.float32)

    def model_params(self, state: dict, float_base: dict | None = None) -> dict:
        """The full parameter tree of the trained model (LoRA adapters merged into their kernels). With LoRA
        the adapters go into `float_base` (the float32 base, for an export) or else into the stored base
        (dequantized: the model the forward trains, e.g. for evaluation)."""
        if self.lora.enabled:
            if float_base is None:
                from pdlm_jax import quantize

                float_base = quantize.dequantize_params(state["frozen"])
            return lora_lib.merge(float_base, state["params"], self.lora)
        return {**state["params"], **state["frozen"]}

    def _loss_and_grad(self, params, frozen, batch, key):
        def loss_fn(p):
            if self.lora.enabled:  # adapters in the compute dtype (their layers' outputs keep it)
                p = jax.tree.map(lambda x: x.astype(self.compute_dtype), p)
                model = nnx.merge(self.graphdef, lora_lib.combine(frozen, p))
                return self._adapted(batch_loss)(model, batch, key, self.mask_id, self.noise_t_min, self.mesh,
                                                 self.packed)
            model = nnx.merge(self.graphdef, {**p, **frozen})
            return batch_loss(model, batch, key, self.mask_id, self.noise_t_min, self.mesh, self.packed)

        if self.attention != "splash":
            return jax.value_and_grad(loss_fn, has_aux=True)(params)
        # the mesh as context: the splash kernel, which XLA cannot partition, runs per device on it
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def _train_step(self, state: dict, batch: TrainBatch):
        params, frozen = state["params"], state["frozen"]
        key = jax.random.fold_in(jax.random.key(self.seed), state["step"])
        n = self.grad_accum
        if n == 1:
            (loss, masked), grads = self._loss_and_grad(params, frozen, batch, key)
        else:
            # (n·B, ...) -> (n, B, ...): sample i goes to micro-batch i % n, keeping B evenly sharded
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)

            def body(carry, xs):
                mb, i = xs
                (l, m), g = self._loss_and_grad(params, frozen, mb, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (l, m, g)), None

            zeros = (jnp.zeros(()), jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params))
            (loss, masked, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(n)))
            loss, grads = loss / n, jax.tree.map(lambda g: g / n, grads)
        updates, opt = self.tx.update(grads, state["opt"], params)
        new_state = {"params": optax.apply_updates(params, updates), "frozen": frozen, "opt": opt,
                     "step": state["step"] + 1}
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": self.schedule(state["step"]),
                   "masked_tokens": masked, "answer_tokens": jnp.sum(batch.labels != IGNORE),
                   "tokens": jnp.sum(batch.inputs.valid)}
        return new_state, metrics

    def jit_step(self):
        """The jitted update (state donated, kept in its shardings); `step` runs it, `pdlm-aot` compiles it."""
        if self._step is None:
            self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings, None),
                                 out_shardings=(self.state_shardings, shd.replicated(self.mesh)), donate_argnums=0)
        return self._step

    def step(self, state: dict, batch: TrainBatch) -> tuple[dict, dict]:
        """One optimizer update on a global batch (jax.Arrays from `put_batch`)."""
        return self.jit_step()(state, batch)

    def put_batch(self, local_batch: TrainBatch) -> TrainBatch:
        """Per-process numpy batch -> global jax.Arrays sharded over the batch axes."""
        def put(v: np.ndarray) -> jax.Array:
            global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
            return jax.make_array_from_process_local_data(shd.batch_sharding(self.mesh, global_shape), v)

        return jax.tree.map(put, local_batch)


def make_trainer(cfg: PDLMConfig, dtype: str, mesh: Mesh, optim, total_steps: int, mask_id: int,
                 seed: int = 0, remat: bool = False, lora: lora_lib.LoraConfig = lora_lib.LoraConfig(),
                 attention: str = "xla", packed: bool = False) -> Trainer:
    model = build_model(cfg, dtype, seed, abstract=True, remat=remat, lora=lora, attention=attention)
    graphdef, state = nnx.split(model)
    quantized_paths = ()
    if lora.enabled and lora.quantized_base:  # QLoRA: the graph and state of the model with quantized kernels
        from pdlm_jax import quantize

        quantized_paths = tuple(quantize.linear_paths(model))
        graphdef, state, _ = quantize.abstract(
            lambda: build_model(cfg, dtype, seed, remat=remat, lora=lora, attention=attention), lora.quantized_base)
    specs = trees.flatten(nnx.to_pure_dict(param_specs(state, mesh)))
    tx, schedule = make_optimizer(optim, total_steps)
    return Trainer(graphdef, cfg, mesh, tx, schedule, mask_id, optim.grad_accum, seed, optim.noise_t_min, lora,
                   lora_lib.adapter_shapes(model), quantized_paths, DTYPES[dtype], attention, specs, packed)


def trainer_for(train_cfg, model_cfg: PDLMConfig, mesh: Mesh, total_steps: int, mask_id: int) -> Trainer:
    """The Trainer a TrainConfig describes (model.dtype / remat, optim, run.seed, lora): what pdlm-train
    runs and what an ahead-of-time plan should compile."""
    m = train_cfg.model
    return make_trainer(model_cfg, m.dtype, mesh, train_cfg.optim, total_steps, mask_id, seed=train_cfg.run.seed,
                        remat=m.remat, lora=train_cfg.lora, attention=m.attention,
                        packed=train_cfg.data.synthetic_questions > 1)


def sincos_2d(grid: int, dim: int) -> np.ndarray:
    """(grid², dim) fixed 2-D sine-cosine position table (MAE): half the channels encode the row, half
    the column, each as sin/cos at geometric frequencies; rows in patch order r·grid + c."""
    quarter = dim // 4
    freqs = 1.0 / 10000.0 ** (np.arange(quarter) / quarter)
    r, c = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = [f(a.reshape(-1, 1) * freqs) for a in (r, c) for f in (np.sin, np.cos)]
    table = np.concatenate(parts, axis=1)
    return np.pad(table, ((0, 0), (0, dim - table.shape[1]))).astype(np.float32)


def new_mask_embedding(cfg: PDLMConfig, seed: int, std: float = 1.0) -> jax.Array:
    """A fresh mask-id embedding table (prompt_numbers, vision hidden) ~ N(0, std²), float32."""
    shape = (cfg.region.prompt_numbers, cfg.vision.hidden_size)
    return std * jax.random.normal(jax.random.key(seed + 1), shape, jnp.float32)


def init_params(cfg: PDLMConfig, seed: int, mesh: Mesh, mask_embed_std: float = 1.0,
                vision_pos_embed: str = "random") -> dict:
    """Randomly initialised float32 params, created directly in their shardings.

    The mask-id embedding is drawn from N(0, mask_embed_std²); the default 1 is the reference's freshly
    added `mask_id_embedding` (PyTorch's nn.Embedding default; `post_init` is never called, SPEC §11.4).
    `vision_pos_embed="sincos"` starts the (learned) ViT position embedding from a 2-D sine-cosine table,
    so a vision tower trained from scratch knows which patches are neighbours from the first step.
    """
    abstract = nnx.state(build_model(cfg, "float32", abstract=True), nnx.Param)
    shardings = nnx.to_pure_dict(param_shardings(abstract, mesh))
    if vision_pos_embed not in VISION_POS_EMBED_INITS:
        raise PDLMError(f"model.vision_pos_embed_init must be one of {VISION_POS_EMBED_INITS}, not "
                        f"{vision_pos_embed!r}")

    def make():
        params = nnx.to_pure_dict(nnx.state(build_model(cfg, "float32", seed), nnx.Param))
        if not cfg.is_base:
            params["mask_embed"]["embedding"] = new_mask_embedding(cfg, seed, mask_embed_std)
        if vision_pos_embed == "sincos":
            params["vision"]["pos_embed"]["embedding"] = jnp.asarray(sincos_2d(cfg.vision.grid_size,
                                                                                cfg.vision.hidden_size))
        return params

    return jax.jit(make, out_shardings=shardings)()
