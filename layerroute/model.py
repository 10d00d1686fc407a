"""``LayerRouteModel``: routers and LoRA over a frozen Hugging Face causal LM."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.generation import GenerateDecoderOnlyOutput, StoppingCriteria, StoppingCriteriaList
from transformers.generation.stopping_criteria import StopStringCriteria

from . import __version__
from .adapter_files import check_adapter_weights, read_adapter_config, read_adapter_weights
from .architectures import ModelShape, find_decoder_blocks, model_shape
from .config import LayerRouteConfig, check_skip_threshold
from .errors import InvalidAdapterError
from .flops import RouteStats, step_route_stats
from .grammar import RowGrammars
from .lm_head import RoutedLMHead
from .router import FAMILIARITY_BUFFERS, ROUTING_STATE, Replay, RoutedBlock, Router, RoutingState

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "layerroute_config.json"
FINGERPRINT_ROWS = 8


class RoutedCache(DynamicCache):
    """A ``DynamicCache`` whose blocks may hold no entries because every row skipped them.

    Sequence length and mask sizes are read from a block that did run, so positions and masks stay right whichever
    blocks the routers skip (block 0 included).

    ``pending`` (``None`` unless a prefill left it): block index -> ``(keys, values, output)`` of the prompt's last
    position, already computed but not yet appended (``chat.prefill_step``). :meth:`LayerRouteModel.generate`
    appends them in its first forward instead of running that position through the blocks again
    (:class:`~layerroute.router.Replay`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def _reference_layer(self, layer_idx: int) -> int:
        if layer_idx < len(self.layers) and self.layers[layer_idx].get_seq_length() > 0:
            return layer_idx
        kind = type(self.layers[layer_idx]) if layer_idx < len(self.layers) else None
        for index, layer in enumerate(self.layers):
            if (kind is None or type(layer) is kind) and layer.get_seq_length() > 0:
                return index
        return layer_idx

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._reference_layer(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._reference_layer(layer_idx))


@dataclass
class LayerRouteOutput:
    """Result of ``LayerRouteModel.forward``.

    Attributes:
        logits: ``(batch, seq_len, vocab)``; ``None`` when ``labels`` were given (the LM head then runs only on the
            supervised positions).
        loss: mean next-token loss over supervised positions, when ``labels`` were given.
        token_nll: ``(batch, seq_len)`` next-token loss of each supervised position (0 elsewhere), aligned with
            ``labels``; when ``labels`` were given.
        target_logits: ``(positions, vocab)``, the LM head on the positions that predict a supervised token, in the
            order of ``labels[:, 1:][labels[:, 1:] != -100]``; when ``labels`` were given (differentiable in
            training, so a loss on the predicted distributions needs no second LM-head pass).
        keep_probs: ``(batch, num_layers)`` keep probability of every block (differentiable in training).
        keep: ``(batch, num_layers)`` bool, which blocks ran for each row.
        router_features: ``(batch, num_layers, hidden)``, what every router read, detached, when the forward was asked
            to record router features and the routers decided (not with ``forced_skip``).
    """

    logits: torch.Tensor | None
    loss: torch.Tensor | None
    token_nll: torch.Tensor | None
    target_logits: torch.Tensor | None
    keep_probs: torch.Tensor
    keep: torch.Tensor
    router_features: torch.Tensor | None = None


class LayerRouteModel(nn.Module):
    """A frozen decoder-only LM with a router in front of every block and LoRA inside.

    Build one with :meth:`from_base` (fresh adapter) or :meth:`from_pretrained` (saved adapter). The wrapped HF model
    stays reachable as ``.base_model``; calling it directly runs every block (routing applies only through this
    class's ``forward`` and ``generate``).
    """

    def __init__(self, base_model: nn.Module, config: LayerRouteConfig, base_model_name_or_path: str | None):
        super().__init__()
        self.config = config
        self.base_model_name_or_path = base_model_name_or_path
        if any(isinstance(m, RoutedBlock) for m in base_model.modules()):
            raise ValueError("this model already carries LayerRoute routers; load a fresh base model to wrap")
        self.shape: ModelShape = model_shape(base_model)
        self.fingerprint = weights_fingerprint(base_model)
        blocks = find_decoder_blocks(base_model)
        _check_lora_targets(blocks[0], config.lora_target_modules)

        base_model.requires_grad_(False)
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=rf".*\.layers\.\d+\..*\.({'|'.join(config.lora_target_modules)})",
        )
        inject_adapter_in_model(lora, base_model)
        for name, parameter in base_model.named_parameters():
            parameter.requires_grad_("lora_" in name)
        self.lora_flops_per_token = _lora_flops_per_token(blocks[0], config.lora_rank)

        hidden_size = self.shape.block.hidden_size
        for index in range(len(blocks)):
            router = Router(hidden_size, config).to(_device_of(blocks[index]))
            blocks[index] = RoutedBlock(blocks[index], router, index, config.router_threshold)
        base_model.set_output_embeddings(RoutedLMHead(base_model.get_output_embeddings()))
        base_model.get_input_embeddings().register_forward_pre_hook(_advance_grammar)
        self.base_model = base_model
        self._local = threading.local()
        self._merged_lora: list[tuple[nn.Module, str, nn.Module]] = []

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(
        cls, model: nn.Module, config: LayerRouteConfig | None = None, base_model_name_or_path: str | None = None
    ) -> "LayerRouteModel":
        """Wrap an already loaded HF causal LM: freeze it, put a router in front of every block and LoRA inside.

        Trainable parameters are exactly the routers and the LoRA weights. ``model`` is modified in place.
        ``base_model_name_or_path`` (default: the model's own ``name_or_path``) is recorded in saved adapters so
        :meth:`from_pretrained` can load the base by itself.
        """
        if base_model_name_or_path is None:
            base_model_name_or_path = getattr(model, "name_or_path", None) or None
        return cls(model, config or LayerRouteConfig(), base_model_name_or_path)

    @property
    def routers(self) -> list[Router]:
        return [block.router for block in self.blocks]

    @property
    def blocks(self) -> list[RoutedBlock]:
        return list(self.base_model.model.layers)

    @property
    def num_layers(self) -> int:
        return self.shape.num_layers

    @property
    def device(self) -> torch.device:
        return self.base_model.get_input_embeddings().weight.device

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights: every router and LoRA parameter, by name (frozen ones included, e.g. the routers
        of a LoRA-only baseline), and the routers' familiarity statistics (:mod:`layerroute.familiarity`)."""
        weights = {name: p.detach() for name, p in self.named_parameters() if "lora_" in name or ".router." in name}
        weights.update((name, b) for name, b in self.named_buffers() if ".router." in name)
        return weights

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def merge_lora(self) -> None:
        """Fold LoRA into the base weights for serving: same outputs, no LoRA matmuls per token.

        Each LoRA-wrapped linear layer is swapped for its plain base layer holding the merged weights, so a served
        token pays no adapter dispatch either. The merged model cannot be trained or saved until
        :meth:`unmerge_lora`.
        """
        if self._merged_lora:
            return
        for parent, name, module in self._lora_slots():
            module.merge()
            setattr(parent, name, module.base_layer)
            self._merged_lora.append((parent, name, module))
        self.lora_flops_per_token = 0

    def unmerge_lora(self) -> None:
        """Undo :meth:`merge_lora`: the LoRA layers come back and the base weights are restored."""
        for parent, name, module in self._merged_lora:
            setattr(parent, name, module)
            module.unmerge()
        self._merged_lora.clear()
        self.lora_flops_per_token = _lora_flops_per_token(self.blocks[0], self.config.lora_rank)

    @property
    def lora_merged(self) -> bool:
        return bool(self._merged_lora)

    @contextmanager
    def lora_disabled(self):
        """Run the frozen base model's weights (LoRA off) inside the block, e.g. to measure the base."""
        if self.lora_merged:
            raise RuntimeError("LoRA is merged into the base weights; call unmerge_lora() before disabling it")
        layers = self._lora_layers()
        for module in layers:
            module.enable_adapters(False)
        try:
            yield
        finally:
            for module in layers:
                module.enable_adapters(True)

    def _lora_slots(self) -> list[tuple[nn.Module, str, nn.Module]]:
        """``(parent, attribute name, LoRA layer)`` for every LoRA layer of the model."""
        return [
            (parent, name, child)
            for parent in self.base_model.modules()
            for name, child in parent.named_children()
            if isinstance(child, LoraLayer)
        ]

    def _lora_layers(self) -> list[nn.Module]:
        return [module for module in self.base_model.modules() if isinstance(module, LoraLayer)]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        forced_skip: Iterable[int] | None = None,
        skip_threshold: float | None = None,
        record_router_features: bool = False,
    ) -> LayerRouteOutput:
        """Run the routed model on full sequences.

        Args:
            input_ids: ``(batch, seq_len)`` token ids.
            attention_mask: ``(batch, seq_len)``, 1 for real tokens and 0 for padding.
            context_mask: ``(batch, seq_len)``, true for the step's context tokens the routers read; defaults to
                ``attention_mask``. Training passes the context only, so routers never see target tokens.
            labels: ``(batch, seq_len)`` next-token targets aligned with ``input_ids`` (``labels[:, t]`` is the
                token at ``t``; ``-100`` is not supervised). When given, the LM head runs only on the positions that
                predict a supervised token.
            forced_skip: bypass the routers: every block runs except these.
            skip_threshold: this call's decision threshold instead of the adapter's ``router_threshold`` (a block
                runs when its keep probability is above it; lower skips less).
            record_router_features: keep every router's features in the output, for router training.

        In training mode every block runs and gates are straight-through; in eval mode skipped blocks do not run.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        state = RoutingState(
            context_mask=(attention_mask if context_mask is None else context_mask).bool(),
            straight_through=self.training,
            forced_skip=None if forced_skip is None else frozenset(forced_skip),
            skip_threshold=check_skip_threshold(skip_threshold),
            router_features={} if record_router_features else None,
        )
        token = ROUTING_STATE.set(state)
        try:
            if labels is None:
                logits = self.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                loss = token_nll = target_logits = None
            else:
                hidden = self.base_model.model(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                ).last_hidden_state
                loss, token_nll, target_logits = self._supervised_loss(hidden, labels)
                logits = None
        finally:
            ROUTING_STATE.reset(token)
        keep_probs = torch.stack([state.keep_probs[i] for i in range(self.num_layers)], dim=1)
        keep = torch.stack([state.keep[i] for i in range(self.num_layers)], dim=1)
        router_features = None
        if state.router_features:
            router_features = torch.stack([state.router_features[i] for i in range(self.num_layers)], dim=1)
        return LayerRouteOutput(logits=logits, loss=loss, token_nll=token_nll, target_logits=target_logits,
                                keep_probs=keep_probs, keep=keep, router_features=router_features)

    def _target_logits(self, hidden: torch.Tensor, predicting: torch.Tensor) -> torch.Tensor:
        """The LM head on the ``predicting`` positions only: ``(positions, vocab)``."""
        return self.base_model.get_output_embeddings()(hidden[:, :-1][predicting])

    def _supervised_loss(self, hidden: torch.Tensor,
                         labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mean loss, ``token_nll`` and ``target_logits`` of :class:`LayerRouteOutput`, read off the final hidden
        states ``(batch, seq_len, hidden)``."""
        targets = labels[:, 1:]
        predicting = targets != -100
        if not bool(predicting.any()):
            raise ValueError("labels supervise no position (every label is -100)")
        logits = self._target_logits(hidden, predicting)
        nll = F.cross_entropy(logits.float(), targets[predicting], reduction="none")
        token_nll = torch.zeros(labels.shape, dtype=nll.dtype, device=nll.device)
        token_nll[:, 1:][predicting] = nll
        return nll.mean(), token_nll, logits

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        forced_skip: Iterable[int] | None = None,
        skip_threshold: float | None = None,
        prefilled: RoutedCache | None = None,
        restrict_lm_head: bool = True,
        **generate_kwargs,
    ):
        """Like HF ``generate``; blocks the routers skip are not executed.

        Routers decide once per row from the prompt (prefill) and the decision holds for every generated token, so
        the KV cache stays consistent. With several rows, a block runs when any row keeps it (rows that skip it keep
        their hidden state); wall-clock savings come from blocks every row skips. ``forced_skip`` and
        ``skip_threshold`` override the routers as in :meth:`forward`.

        ``prefilled`` continues from a :class:`RoutedCache` that already holds every prompt token but the last, filled
        under the decisions ``forced_skip`` gives (a server that routes and prefills steps one by one, then decodes
        the steps that skip the same blocks as one batch); it is filled further in place. When it carries the last
        position as ``pending`` (``chat.prefill_step`` leaves it so), the first forward appends those entries and
        takes the blocks' outputs from there instead of running the last prompt token again: the call executes, and
        its route counts, exactly what a plain ``generate`` of the prompt under the same decisions does (prefill and
        all), and generation (logits processors, streamers, stopping criteria) goes on as it would there.

        With a grammar among the logits processors (:meth:`layerroute.grammar.DecodingGrammars.processor`) and
        ``restrict_lm_head``, a forward where the grammar allows few tokens computes only their logits
        (:mod:`layerroute.lm_head`); the others are ``-inf``, as the grammar masks them. The tokens generated are the
        same, up to floating-point rounding of the logits; ``output_logits`` (the raw logits) turns it off.

        After the call, :attr:`last_route` (batch of one) and :attr:`last_routes` (one per row) hold this thread's
        :class:`RouteStats`, and :attr:`last_lengths` the tokens each row generated. A row of a batch ends at its
        first end token, stop string or stopping criterion (HF pads it while the others go on); its route counts the
        tokens up to there, as the same row generated alone.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if "cache" in generate_kwargs or "past_key_values" in generate_kwargs:
            raise ValueError("LayerRouteModel.generate manages its own KV cache; pass a prefilled one as `prefilled`")
        if prefilled is not None and forced_skip is None:
            raise ValueError("a prefilled cache holds the blocks its decisions kept: pass those as forced_skip")
        if prefilled is not None and generate_kwargs.get("use_cache") is False:
            raise ValueError("a prefilled cache needs use_cache")
        state = RoutingState(
            context_mask=attention_mask.bool(),
            forced_skip=None if forced_skip is None else frozenset(forced_skip),
            skip_threshold=check_skip_threshold(skip_threshold),
        )
        if restrict_lm_head and not generate_kwargs.get("output_logits"):
            state.grammar = next((p for p in generate_kwargs.get("logits_processor") or ()
                                  if isinstance(p, RowGrammars)), None)
        if prefilled is not None and prefilled.pending is not None:
            kept = {i for i in range(self.num_layers) if i not in state.forced_skip}
            if set(prefilled.pending) != kept:
                raise ValueError(f"the prefilled cache ran blocks {sorted(prefilled.pending)}, but forced_skip keeps "
                                 f"{sorted(kept)}")
            pending, prefilled.pending = prefilled.pending, None
            if generate_kwargs.get("max_new_tokens") == 0:  # nothing to replay into: the cache takes the position
                for index, (keys, values, _) in pending.items():
                    prefilled.update(keys, values, index)
            else:
                state.replay = Replay(prefilled, dict(pending))
        if generate_kwargs.get("max_new_tokens") == 0:
            return self._generate_nothing(input_ids, state, prefilled, generate_kwargs)
        was_training = self.training
        self.eval()
        ends = _RowEnds.wrap(generate_kwargs, input_ids.shape[1], input_ids.shape[0])
        token = ROUTING_STATE.set(state)
        try:
            if prefilled is not None:
                generate_kwargs["cache"] = prefilled
            elif generate_kwargs.get("use_cache", True):
                generate_kwargs["cache"] = RoutedCache(config=self.base_model.config)
            output = self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        finally:
            ROUTING_STATE.reset(token)
            self.train(was_training)
        sequences = output.sequences if hasattr(output, "sequences") else output
        self._local.lengths = self._lengths(sequences[:, input_ids.shape[1] :], ends)
        self._local.routes = self._route_stats(state, attention_mask, self._local.lengths)
        return output

    def _generate_nothing(self, input_ids: torch.Tensor, state: RoutingState, prefilled: RoutedCache | None,
                          generate_kwargs: dict):
        """``max_new_tokens=0`` (which HF ``generate`` rejects): the prompt comes back as it is and no block runs, so
        the route stats count zero FLOPs and skip only the ``forced_skip`` blocks (no router decided). A streamer sees
        the prompt and its end, as HF ``generate`` feeds it."""
        streamer = generate_kwargs.get("streamer")
        if streamer is not None:
            streamer.put(input_ids.cpu())
            streamer.end()
        skipped = sorted(state.forced_skip or ())
        self._local.routes = [RouteStats(skipped_layers=skipped, num_layers=self.num_layers, flops_total=0,
                                         flops_skipped=0) for _ in range(input_ids.shape[0])]
        self._local.lengths = [0] * input_ids.shape[0]
        config = generate_kwargs.get("generation_config") or self.base_model.generation_config
        if not generate_kwargs.get("return_dict_in_generate", config.return_dict_in_generate):
            return input_ids.clone()
        scores = () if generate_kwargs.get("output_scores", config.output_scores) else None
        logits = () if generate_kwargs.get("output_logits", config.output_logits) else None
        return GenerateDecoderOnlyOutput(sequences=input_ids.clone(), scores=scores, logits=logits, cache=prefilled)

    @property
    def last_route(self) -> RouteStats:
        """Route stats of this thread's last ``generate`` call (batch of one)."""
        routes = self.last_routes
        if len(routes) != 1:
            raise ValueError(f"the last generate call had {len(routes)} rows; read `last_routes` instead")
        return routes[0]

    @property
    def last_routes(self) -> list[RouteStats]:
        """Route stats of this thread's last ``generate`` call, one per row."""
        routes = getattr(self._local, "routes", None)
        if routes is None:
            raise RuntimeError("no generate call has finished in this thread yet")
        return routes

    @property
    def last_lengths(self) -> list[int]:
        """Tokens each row of this thread's last ``generate`` call generated, up to and including its end (an end
        token, or the last token before a stop string or stopping criterion ended it); later positions of a row are
        padding."""
        lengths = getattr(self._local, "lengths", None)
        if lengths is None:
            raise RuntimeError("no generate call has finished in this thread yet")
        return lengths

    def _lengths(self, new_tokens: torch.Tensor, ends: _RowEnds | None) -> list[int]:
        eos = self.base_model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        lengths = []
        for row, tokens in enumerate(new_tokens.tolist()):
            generated = len(tokens)
            for position, token_id in enumerate(tokens):
                if token_id in eos_ids:
                    generated = position + 1
                    break
            if ends is not None and ends.ends[row] is not None:
                generated = min(generated, ends.ends[row])
            lengths.append(generated)
        return lengths

    def _route_stats(self, state: RoutingState, attention_mask: torch.Tensor, lengths: list[int]) -> list:
        keep = torch.stack([state.keep[i] for i in range(self.num_layers)], dim=1).cpu()
        routes = []
        for row in range(keep.shape[0]):
            context = int(attention_mask[row].sum())
            generated = lengths[row]
            routes.append(
                step_route_stats(
                    skipped_layers=[i for i in range(self.num_layers) if not keep[row, i]],
                    num_layers=self.num_layers,
                    block=self.shape.block,
                    context_tokens=context,
                    forwarded_tokens=context + max(generated - 1, 0),
                    lm_head_logits=sum(state.lm_head_logits[:generated]),
                    extra_flops_per_token=self.lora_flops_per_token,
                )
            )
        return routes

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the adapter (safetensors) and its config, with the base model's identity, atomically."""
        if self.lora_merged:
            raise RuntimeError("LoRA is merged into the base weights; call unmerge_lora() before saving")
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        metadata = {
            "layerroute_version": __version__,
            "config": self.config.to_dict(),
            "base_model": {
                "name_or_path": self.base_model_name_or_path,
                "shape": self.shape.to_dict(),
                "fingerprint": self.fingerprint,
            },
        }
        weights = {name: t.contiguous().cpu() for name, t in self.trainable_state_dict().items()}
        _atomic_write(directory / ADAPTER_WEIGHTS, lambda path: save_file(weights, path, metadata={"format": "pt"}))
        _atomic_write(directory / ADAPTER_CONFIG, lambda path: Path(path).write_text(json.dumps(metadata, indent=2)))

    @classmethod
    def from_pretrained(
        cls, adapter_dir: str | os.PathLike, base_model: nn.Module | str | None = None, *, allow_pickle: bool = False
    ) -> "LayerRouteModel":
        """Load a saved adapter onto ``base_model``.

        The adapter's files are checked before any weight is loaded (:mod:`layerroute.adapter_files`): a weights file
        cut short or corrupted, a config edited into keys, types or values ``save_pretrained`` never writes, or
        weights whose names or shapes disagree with the config are refused, with the file and the reason.

        Args:
            adapter_dir: a directory written by :meth:`save_pretrained`.
            base_model: a loaded HF causal LM, a name or path for :func:`load_base_model`, or ``None`` for the base
                recorded in the adapter.
            allow_pickle: an adapter whose weights exist only as a pickle-based ``adapter_model.bin`` / ``.pt`` /
                ``.pth`` is refused, since unpickling can run code; with ``True`` such a file is read as plain tensors
                (``torch.load(weights_only=True)``, which runs none). Safetensors weights are always preferred.

        Raises:
            MissingInputError: the directory holds no adapter (a ``FileNotFoundError``).
            InvalidAdapterError: the adapter's files cannot be trusted (a ``ValueError``; the message names the file
                and what is wrong).
            ValueError: the base model does not match the one the adapter was trained on (the error names what
                differs).
        """
        directory = Path(adapter_dir)
        config_path = directory / ADAPTER_CONFIG
        config, recorded = read_adapter_config(config_path, FINGERPRINT_ROWS)
        weights, weights_path = read_adapter_weights(directory, ADAPTER_WEIGHTS, allow_pickle=allow_pickle)
        if base_model is None or isinstance(base_model, str):
            from .loading import load_base_model

            base_model, _ = load_base_model(base_model if base_model is not None else recorded["name_or_path"])
        _check_base_matches(base_model, recorded, directory)
        try:
            _check_lora_targets(find_decoder_blocks(base_model)[0], config.lora_target_modules)
        except ValueError as error:
            raise InvalidAdapterError(f"{config_path}: {error}") from None
        model = cls(base_model, config, recorded["name_or_path"])
        expected = model.trainable_state_dict()
        unfitted = {name for name in set(expected) - set(weights) if name.rsplit(".", 1)[-1] in FAMILIARITY_BUFFERS}
        check_adapter_weights(weights, {name: t for name, t in expected.items() if name not in unfitted}, weights_path,
                              config_path)
        if unfitted:
            warnings.warn(f"{weights_path} was saved before routers kept familiarity statistics: every step counts as "
                          "familiar (no do-no-harm check); fit them with layerroute.familiarity.fit_familiarity",
                          stacklevel=2)
        model.load_state_dict(weights, strict=False)
        return model

def weights_fingerprint(model: nn.Module) -> list[float]:
    """A dtype-tolerant summary of the input embeddings: mean absolute value of a few fixed rows."""
    weight = model.get_input_embeddings().weight
    rows = torch.linspace(0, weight.shape[0] - 1, FINGERPRINT_ROWS).long()
    return [round(float(v), 6) for v in weight[rows.to(weight.device)].detach().float().abs().mean(dim=1)]


def _check_base_matches(base_model: nn.Module, recorded: dict, adapter_dir: Path) -> None:
    shape = model_shape(base_model).to_dict()
    differences = [
        f"{key}: adapter {recorded['shape'][key]!r} vs base {shape.get(key)!r}"
        for key in recorded["shape"]
        if recorded["shape"][key] != shape.get(key)
    ]
    if differences:
        raise ValueError(
            f"the adapter in {adapter_dir} was trained on {recorded['name_or_path']!r} and does not fit this base "
            f"model: {'; '.join(differences)}"
        )
    fingerprint = weights_fingerprint(base_model)
    if not torch.allclose(torch.tensor(fingerprint), torch.tensor(recorded["fingerprint"]), rtol=2e-2, atol=1e-4):
        raise ValueError(
            f"the adapter in {adapter_dir} was trained on {recorded['name_or_path']!r}; this base model has the same "
            "shape but different weights (embedding fingerprint "
            f"{fingerprint} vs recorded {recorded['fingerprint']})"
        )


def _check_lora_targets(block: nn.Module, targets: list[str]) -> None:
    linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in block.named_modules() if isinstance(m, nn.Linear)})
    missing = [t for t in targets if t not in linear_names]
    if missing:
        raise ValueError(
            f"LoRA target modules {missing} do not exist in {type(block).__name__}; "
            f"its linear layers are {linear_names}"
        )


def _lora_flops_per_token(block: nn.Module, rank: int) -> int:
    total = 0
    for module in block.modules():
        if isinstance(module, LoraLayer) and isinstance(module.base_layer, nn.Linear):
            total += 2 * rank * (module.base_layer.in_features + module.base_layer.out_features)
    return total


class _RowEnds(StoppingCriteria):
    """The per-row stopping criteria of one ``generate`` call (its own, and its stop strings) as one, remembering
    after how many new tokens each row first met one: HF pads a row that ended while its batch goes on, and a padding
    token that is also an end token must not count as generated."""

    def __init__(self, criteria: list, prompt_length: int, rows: int):
        self.criteria = criteria
        self.prompt_length = prompt_length
        self.ends: list[int | None] = [None] * rows

    @classmethod
    def wrap(cls, generate_kwargs: dict, prompt_length: int, rows: int) -> _RowEnds | None:
        """Replace ``generate_kwargs``' ``stopping_criteria`` and ``stop_strings`` by one :class:`_RowEnds`."""
        criteria = list(generate_kwargs.get("stopping_criteria") or [])
        if generate_kwargs.get("stop_strings") and generate_kwargs.get("tokenizer") is not None:
            criteria.append(StopStringCriteria(tokenizer=generate_kwargs["tokenizer"],
                                               stop_strings=generate_kwargs.pop("stop_strings")))
        if not criteria:
            return None
        ends = cls(criteria, prompt_length, rows)
        generate_kwargs["stopping_criteria"] = StoppingCriteriaList([ends])
        return ends

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for criterion in self.criteria:
            done = done | criterion(input_ids, scores, **kwargs).to(done.device)
        for row in done.nonzero().flatten().tolist():
            if self.ends[row] is None:
                self.ends[row] = input_ids.shape[1] - self.prompt_length
        return done


def _advance_grammar(module: nn.Module, inputs: tuple) -> None:
    """Before a forward's blocks and LM head run, its grammar takes the token generated last, so that the head knows
    what the grammar allows next."""
    state = ROUTING_STATE.get()
    if state is not None and state.grammar is not None:
        state.grammar.advance(inputs[0])


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _atomic_write(path: Path, write) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; an adapter is meant to be shared
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
