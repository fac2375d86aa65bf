"""An independent, functional transcription of the released HGRNBit forward (ridger/MMfreeLM).

Written the way the released code computes: activations and weights fake-quantised (dequantised)
then an ordinary linear map, a naive recurrent loop, and state dict keys read directly. It shares
no code with mmf, so agreement with `mmf.load_model` checks the import end to end.
"""

import torch
import torch.nn.functional as F


def _rms(x, w, eps):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def _act_quant(x):
    scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    return (x * scale).round().clamp_(-128, 127) / scale


def _weight_quant(w):
    scale = 1.0 / w.abs().mean().clamp_(min=1e-5)
    return (w * scale).round().clamp_(-1, 1) / scale


def _bitlinear(sd, prefix, x):
    xn = _rms(x, sd[prefix + ".norm.weight"], 1e-6)
    return F.linear(_act_quant(xn), _weight_quant(sd[prefix + ".weight"].float()))


def hgrn_bit_logits(sd: dict, cfg: dict, input_ids: torch.Tensor) -> torch.Tensor:
    sd = {k: v.float() for k, v in sd.items()}
    eps = cfg.get("rms_norm_eps", 1e-6)
    L = cfg["num_hidden_layers"]
    x = sd["model.embeddings.weight"][input_ids]
    lb = sd["model.lower_bounds"].softmax(0)
    lb = lb.cumsum(0) - lb[0]
    for l in range(L):
        p = f"model.layers.{l}."
        h = _rms(x, sd[p + "attn_norm.weight"], eps)
        i = _bitlinear(sd, p + "attn.i_proj", h)
        f = torch.sigmoid(_bitlinear(sd, p + "attn.f_proj", h))
        if l > 0:
            f = lb[l] + (1 - lb[l]) * f
        i = F.silu(i) * (1 - f)
        s = torch.zeros_like(i[:, 0])
        states = []
        for t in range(i.shape[1]):
            s = f[:, t] * s + i[:, t]
            states.append(s)
        s = torch.stack(states, 1)
        g = _bitlinear(sd, p + "attn.g_proj", h)
        o = _rms(g, sd[p + "attn.g_norm.weight"], eps) * s * torch.sigmoid(s)
        x = x + _bitlinear(sd, p + "attn.o_proj", o)
        h = _rms(x, sd[p + "mlp_norm.weight"], eps)
        gate, up = _bitlinear(sd, p + "mlp.gate_proj", h).chunk(2, -1)
        x = x + _bitlinear(sd, p + "mlp.down_proj", F.silu(gate) * up)
    return _bitlinear(sd, "lm_head", _rms(x, sd["model.norm.weight"], eps))
