"""
The optimizer, and the master dtype (issue 20: Skywork-R1V3-38B GRPO on one 8 x 80 GB node without offload).

    optimizer = build_optimizer(groups, master_dtype, lr=lr, betas=(0.9, beta2), eps=1e-8, weight_decay=wd, seed=seed)

master_dtype "float32" (the default): fp32 masters, gradients and AdamW state (16 bytes a trainable parameter), and
torch.optim.AdamW. "bfloat16": the model's parameters are stored in bf16 (build_model(master_dtype=torch.bfloat16)),
so are their FSDP2 gradient shards, and AdamW below keeps exp_avg and exp_avg_sq in bf16 too: 8 bytes a trainable
parameter (2 + 2 + 2 + 2), half. Skywork-R1V3-38B on 8 GPUs: 35.8 GB per GPU instead of 71.5 (tools/plan.py).

bf16 has an 8-bit significand: a plain bf16 update p + u with |u| < ~|p| / 512 rounds back to p. At RL learning rates
(1e-6, Adam's update ~lr per element) every update of an O(1e-2..1) weight is below that, so plain bf16 AdamW
(torch.optim.AdamW on bf16 parameters) does not move the model at all. AdamW here computes each step in fp32 from
the bf16 state and writes the parameter (and both moments: exp_avg_sq at beta2 = 0.999 would never decay under
round-to-nearest either) back with STOCHASTIC ROUNDING: x is rounded up to the next bf16 with probability equal to
its distance from the lower one over the bf16 spacing, so E[round(x)] = x and small updates are kept on average
(tests/test_optim.py: 300 steps at lr 1e-6 move the weights as far as fp32 masters do, within a few %; plain bf16
AdamW moves them 0). Chosen over Kahan-compensated summation because it needs no extra memory (Kahan: a bf16
compensation buffer per parameter, 2 more bytes a parameter, 8.9 GB more per GPU at 38B on 8) and it keeps the moments
unbiased as well; its cost is noise of ~one bf16 spacing per element per step, zero-mean.

The trick (as torchao's bf16_stochastic_round): view the fp32 value as int32, add a uniform random integer in
[0, 2^16), clear the low 16 bits; the result is exactly a bf16 value. A value that already is one stays exactly as it
is (so a step with lr = 0, as torch.distributed.checkpoint runs to initialise the state, changes nothing).

FSDP2: parameters, gradients and states are DTensors (the states are made with zeros_like, sharded like the
parameter, so DCP saves and reshards them); the step works on each one's local shard (DTensor.to_local()).
Reproducible: the random numbers of a parameter's step come from a generator seeded by (seed, the parameter's index
in the param groups, its step count, the coordinates of its shard on the mesh), so a run resumed from a checkpoint
(the step counts are in the optimizer state) draws exactly what the uninterrupted run would have, and the
replicated copies of a parameter (a plain tensor in a DDP-style run, or a DTensor dim that is Replicate) round
alike. Resumed on a different number of ranks, the shards differ and so do the draws (statistically the same).
The state dict has torch.optim.AdamW's keys, so a run may change master_dtype when it resumes, either way (the
weights and moments are cast on load).

What is NOT kept in fp32 with master_dtype="bfloat16": FSDP2 reduce-scatters each micro-batch's gradient in fp32
(MixedPrecisionPolicy reduce_dtype=float32) and casts the result to the parameter's dtype, so gradient accumulation
over micro-batches adds bf16 shards (round-to-nearest, ~2^-9 relative per add, zero-mean noise); the gradient norm
and clipping run on bf16 gradients.
"""
import torch
from torch.distributed.tensor import DTensor

MASTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STATE_BYTES = {"float32": 4, "bfloat16": 2}  # bytes of a master / gradient / AdamW moment element


def master_torch_dtype(master_dtype):
    """The torch dtype of a master_dtype config value ("float32" | "bfloat16"); a one-line error for anything else."""
    if master_dtype not in MASTER_DTYPES:
        raise ValueError(f"master_dtype={master_dtype!r}: must be one of {', '.join(map(repr, MASTER_DTYPES))}")
    return MASTER_DTYPES[master_dtype]


def build_optimizer(params, master_dtype="float32", *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=0):
    """The run's optimizer: torch.optim.AdamW for fp32 masters, AdamW (bf16 state, stochastic rounding) for bf16
    ones. params: parameters or param groups, as torch.optim takes them."""
    if master_torch_dtype(master_dtype) == torch.float32:
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, seed=seed)


def stochastic_round_(dst, src, generator=None):
    """dst (bf16) <- src (fp32, contiguous; used as scratch and left changed) rounded stochastically: up to the next
    bf16 with probability (src - lower) / spacing. Unbiased; a bf16-representable src is copied exactly."""
    assert src.dtype == torch.float32 and dst.dtype == torch.bfloat16, (src.dtype, dst.dtype)
    bits = src.view(torch.int32)  # the magnitude is in the low 31 bits, whatever the sign: adding rounds |x| up
    bits.add_(torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device, generator=generator))
    bits.bitwise_and_(-65536)  # 0xFFFF0000: keep sign, exponent and bf16's 7 mantissa bits
    dst.copy_(src)  # exact
    return dst


def _mix(*xs):
    # splitmix64 over the key: a seed for torch.Generator.manual_seed (< 2^63)
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _shard_key(p):
    """Where this process's piece of p sits: the mesh coordinates of p's Shard dims (a DTensor), else () (a plain
    tensor, the same on every rank that holds it)."""
    if not isinstance(p, DTensor):
        return ()
    coord = p.device_mesh.get_coordinate() or []
    return tuple(c for c, pl in zip(coord, p.placements) if pl.is_shard())


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _torch_adamw_defaults():
    return dict(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).defaults)


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected, as torch.optim.AdamW) whose parameters and moments stay in the
    parameters' dtype: each step upcasts one parameter's shard, gradient and moments to fp32, updates them there and
    writes them back, bf16 ones with stochastic rounding (stochastic_round=False: round to nearest, i.e. plain bf16,
    for comparison). fp32 parameters are updated exactly as torch.optim.AdamW does (to fp32 rounding).
    Step-time memory beyond the states: fp32 copies of one tensor's shard (gradient, both moments, parameter, the
    denominator) + its int32 random numbers, ~24 bytes per element of the largest trainable tensor's shard.
    The state (step, exp_avg, exp_avg_sq per parameter) loads and saves as torch.optim.AdamW's does (DCP included)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, stochastic_round=True,
                 seed=0):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"plumbing/optim.py AdamW: bad hyperparameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        # the param groups hold torch.optim.AdamW's keys, with its defaults for those this class ignores (amsgrad,
        # foreach, ...: this torch's own list), so checkpoints go both ways between an fp32-master run (torch's
        # AdamW) and a bf16-master one: the saved moments are cast to the parameters' dtype on load
        defaults = dict(_torch_adamw_defaults(), lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.seed, self.stochastic_round = int(seed), bool(stochastic_round)
        self._generators = {}  # device -> torch.Generator, reseeded per parameter and step

    def _generator(self, device):
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            lr = float(lr)
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("plumbing/optim.py AdamW: sparse gradients are not supported")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = int(state["step"].item())
                lp, m, v = _local(p), _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                g = _local(p.grad).float()
                m32 = m.float()  # a copy for bf16; the state itself for fp32 (updated in place)
                m32.mul_(beta1).add_(g, alpha=1 - beta1)
                v32 = v.float()
                v32.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                del g
                bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
                denom = (v32 / bc2).sqrt_().add_(eps)
                p32 = lp.float()
                if wd:
                    p32.mul_(1 - lr * wd)
                p32.addcdiv_(m32, denom, value=-lr / bc1)
                del denom
                gen = None
                if lp.dtype == torch.bfloat16 and self.stochastic_round:
                    gen = self._generator(lp.device)
                    gen.manual_seed(_mix(self.seed, index, t, *_shard_key(p)))
                for dst, src in ((lp, p32), (m, m32), (v, v32)):
                    if src is dst:  # fp32: updated in place
                        continue
                    if gen is not None:
                        stochastic_round_(dst, src.contiguous(), gen)
                    else:
                        dst.copy_(src)
        return loss
