"""Fast all-candidate scoring (spec §6.3, issue 10): each question prompt once, each answer prefix once.

OFA scores a closed answer set (VQA's 3,129 answers, SNLI-VE's three labels) by teacher-forcing every candidate
after the sample's decoder prompt, so with `prev_output` prompts it re-runs the decoder over the whole question
(~20 tokens) for each of the 3,129 candidates although only their 1-3 answer tokens differ. Here, per batch:

1. The decoder runs once over the (right-padded) prompts with a KV cache: per layer the self-attention keys and
   values of the prompt, the cross-attention keys/values of the encoder output and the cross-position keys.
2. The candidates form a prefix tree; level d holds the distinct answer prefixes of length d (sorted, so siblings
   are adjacent and a chunk's ancestors are few). A node is one query whose token sits at position p_b + d - 1
   (p_b: sample b's prompt length), exactly where the naive pass puts it. It attends to its sample's cached prompt
   keys (positions < p_b), its ancestors' keys (kept from earlier levels, for nodes with children only) and
   itself; every other key is masked through the additive bias. The absolute and per-layer relative position
   biases and the cross-attention bias are looked up for the positions each query and key have in the naive
   pass, so the scores agree to rounding.
3. A node's output gives the log-probabilities of its children and of eos, the logits masked to
   `constraint_trie.get_next_layer([bos] + prefix)` first (as the naive path does); a candidate's score is the sum
   along its path, eos included. The prompt's last output is the root's.

A pass holds at most `rows_per_pass` (sample, node) query rows. The decoder's modules are called as modules (the
layer with its cache API, the tables, the tied projection), so ZeRO-3 gathers parameters and TP splits heads as in
any forward. Text-mode rows only: code-mode (image-token) rows keep the naive path.

Distributed evaluation: `run_in_lockstep` runs a list of decoder passes so that every rank issues the same number,
adding idle passes (same modules, results dropped) on ranks that have fewer.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from ofa_scale.model.decoder import CROSS_POS_K_KEY
from ofa_scale.model.kernels import mask_value
from ofa_scale.utils.trie import Trie

Lockstep = Callable[[bool], bool]


def run_in_lockstep(passes: Iterable[Callable[[], None]], idle: Callable[[], None],
                    lockstep: Lockstep | None) -> None:
    """Run `passes` in order. With a lockstep, every rank asks lockstep(no pass left) before each pass and runs
    `idle` instead once it has none, until the lockstep says every rank has finished: all ranks run the same
    number of passes (each a collective under ZeRO-3/TP)."""
    if lockstep is None:
        for run in passes:
            run()
        return
    todo = iter(passes)
    pending = next(todo, None)
    while not lockstep(pending is None):
        if pending is None:
            idle()
        else:
            pending()
            pending = next(todo, None)


class CandidateTree:
    """The candidates' distinct prefixes by depth, the (node, next token) edges scored at each node, and each
    candidate's path of edges."""

    def __init__(self, candidates: Sequence[Sequence[int]], eos: int):
        self.prefixes: list[tuple[int, ...]] = [()]
        index: dict[tuple[int, ...], int] = {(): 0}
        for cand in candidates:
            for d in range(1, len(cand) + 1):
                if tuple(cand[:d]) not in index:
                    index[tuple(cand[:d])] = len(self.prefixes)
                    self.prefixes.append(tuple(cand[:d]))
        self.index = index
        depth = max(len(p) for p in self.prefixes)
        self.levels = [sorted((i for i, p in enumerate(self.prefixes) if len(p) == d), key=self.prefixes.__getitem__)
                       for d in range(depth + 1)]
        # nodes with children keep their keys/values for their descendants: row in their level's store
        parents = {index[p[:-1]] for p in self.prefixes if p}
        self.store_row: dict[int, int] = {}
        self.store_size = [0] * (depth + 1)
        for d, level in enumerate(self.levels):
            for node in level:
                if node in parents:
                    self.store_row[node] = self.store_size[d]
                    self.store_size[d] += 1
        # edges: a node's children tokens, plus eos where a candidate ends
        self.edges: dict[int, list[tuple[int, int]]] = {}  # node -> [(edge id, token)]
        edge_id: dict[tuple[int, int], int] = {}

        def edge(node: int, tok: int) -> int:
            if (node, tok) not in edge_id:
                edge_id[(node, tok)] = len(edge_id)
                self.edges.setdefault(node, []).append((edge_id[(node, tok)], tok))
            return edge_id[(node, tok)]

        paths = [[edge(index[tuple(c[:k])], c[k]) for k in range(len(c))] + [edge(index[tuple(c)], eos)]
                 for c in candidates]
        self.num_edges = len(edge_id)
        # padded with an extra edge whose log-prob is 0
        self.paths = torch.full((len(paths), depth + 1), self.num_edges, dtype=torch.long)
        for i, p in enumerate(paths):
            self.paths[i, :len(p)] = torch.tensor(p, dtype=torch.long)

    @property
    def depth(self) -> int:
        return len(self.levels) - 1

    def ancestor(self, node: int, depth: int) -> int:
        return self.index[self.prefixes[node][:depth]]


class _TreeScorer:
    """One batch: the prompt pass, then tree passes level by level (module docstring)."""

    def __init__(self, decoder, encoder_out, prompts: list[list[int]], tree: CandidateTree, trie: Trie | None,
                 bos: int, pad: int):
        self.decoder, self.encoder_out, self.tree, self.trie, self.bos = decoder, encoder_out, tree, trie, bos
        device = encoder_out.states.device
        bsz = len(prompts)
        self.bsz, self.device = bsz, device
        self.prompt_len = torch.tensor([len(p) for p in prompts], device=device)
        width = max(len(p) for p in prompts)
        self.width = width
        tokens = torch.full((bsz, width), pad, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        self.edge_lp = torch.zeros(bsz, tree.num_edges + 1, device=device)  # + the padding edge (0)
        # --- the prompt pass: fills the cache; its output at p_b - 1 is the root's
        self.state: dict = {}
        logits = decoder(tokens, encoder_out, incremental_state=self.state)
        self._score_edges(logits[torch.arange(bsz, device=device), self.prompt_len - 1][:, None], [0])
        # --- position tables for every position a node can take (prompt + answer)
        total = width + tree.depth
        pos = decoder.target_positions(total, None, 1)  # (1, T, D)
        q = decoder._heads(decoder.self_pos_q_linear(pos)) * decoder.pos_scaling
        k = decoder._heads(decoder.self_pos_k_linear(pos))
        abs_bias = torch.matmul(q, k.transpose(2, 3))[0]  # (H, T, T)
        buckets = decoder.token_rp_bucket[:total, :total]
        self.self_tables = [abs_bias + table(buckets).permute(2, 0, 1).to(abs_bias.dtype)
                            for table in decoder.token_rel_pos_table_list]
        cq = decoder._heads(decoder.cross_pos_q_linear(pos)) * decoder.pos_scaling  # (1, H, T, hd)
        self.cross_table = torch.matmul(cq, self.state[CROSS_POS_K_KEY].transpose(2, 3))  # (B, H, T, L)
        self.mask_value = mask_value(abs_bias.dtype)
        self.store: list[list[tuple[torch.Tensor, torch.Tensor] | None]] = [
            [None] * len(decoder.layers) for _ in range(tree.depth + 1)]

    # ------------------------------------------------------------------------------------------- passes
    def passes(self, rows_per_pass: int) -> list[Callable[[], None]]:
        per = max(1, rows_per_pass // max(self.bsz, 1))
        return [(lambda d=d, chunk=level[i:i + per]: self._pass(d, chunk))
                for d, level in enumerate(self.tree.levels) if d > 0 for i in range(0, len(level), per)]

    def idle(self) -> None:
        """A pass over one throw-away level-1 node: the same modules as a real pass, nothing recorded."""
        self._forward(depth=1, nodes=[self.tree.levels[1][0] if self.tree.depth else 0], ancestors=[],
                      tree_mask=torch.ones(1, 1, dtype=torch.bool), record=False)

    def _pass(self, depth: int, nodes: list[int]) -> None:
        tree = self.tree
        ancestors: list[tuple[int, list[int]]] = []  # (level, store rows)
        columns: list[torch.Tensor] = []  # per level: each query's ancestor column
        offset = 0
        for e in range(1, depth):
            anc = [tree.store_row[tree.ancestor(n, e)] for n in nodes]
            rows = sorted(set(anc))
            where = {r: offset + i for i, r in enumerate(rows)}
            columns.append(torch.tensor([where[r] for r in anc]))
            ancestors.append((e, rows))
            offset += len(rows)
        c = len(nodes)
        tree_mask = torch.zeros(c, offset + c, dtype=torch.bool)
        for col in columns:
            tree_mask[torch.arange(c), col] = True
        tree_mask[torch.arange(c), offset + torch.arange(c)] = True
        logits = self._forward(depth, nodes, ancestors, tree_mask, record=True)
        self._score_edges(logits, nodes)

    def _forward(self, depth: int, nodes: list[int], ancestors: list[tuple[int, list[int]]],
                 tree_mask: torch.Tensor, record: bool) -> torch.Tensor:
        """One query per node of level `depth` and sample; keys: the prompt, `ancestors` ((level, store rows)),
        the queries, visible per `tree_mask` (c, ancestors + c) -> logits (B, c, V)."""
        dec, bsz, device, tree = self.decoder, self.bsz, self.device, self.tree
        c = tree_mask.shape[0]
        last = torch.tensor([tree.prefixes[n][-1] if tree.prefixes[n] else self.bos for n in nodes],
                            device=device)
        x = dec.layernorm_embedding(dec.embed_tokens(last[None].expand(bsz, c)))
        # key positions: the prompt (0..width-1), the ancestors (p_b + e - 1), the queries themselves (p_b + d - 1)
        p = self.prompt_len[:, None]
        anc_pos = [(p + e - 1).expand(bsz, len(rows)) for e, rows in ancestors]
        here = p + depth - 1  # (B, 1)
        key_pos = torch.cat([torch.arange(self.width, device=device)[None].expand(bsz, -1), *anc_pos,
                             here.expand(bsz, c)], dim=1)  # (B, K)
        visible = torch.cat([(torch.arange(self.width, device=device)[None] < p)[:, None].expand(bsz, c, -1),
                             tree_mask.to(device)[None].expand(bsz, -1, -1)], dim=2)  # (B, c, K)
        hidden = torch.zeros(visible.shape, dtype=self.cross_table.dtype, device=device)
        hidden = hidden.masked_fill(~visible, self.mask_value)[:, None]  # (B, 1, c, K)
        cross = self.cross_table[torch.arange(bsz, device=device), :, here[:, 0]][:, :, None]  # (B, H, 1, L)
        for i, layer in enumerate(dec.layers):
            prompt_cache = self.state[f"decoder.layers.{i}"]
            keys = [prompt_cache["self_attn"]["k"]] + [self.store[e][i][0][:, :, rows] for e, rows in ancestors]
            values = [prompt_cache["self_attn"]["v"]] + [self.store[e][i][1][:, :, rows] for e, rows in ancestors]
            cache = {"self_attn": {"k": torch.cat(keys, dim=2), "v": torch.cat(values, dim=2)},
                     "encoder_attn": prompt_cache["encoder_attn"]}
            table = self.self_tables[i]  # (H, T, T)
            bias = table[:, here, key_pos].permute(1, 0, 2)[:, :, None] + hidden  # (B, H, c, K)
            x = layer(x, None, bias, self.encoder_out.states, self.encoder_out.padding_mask, cross,
                      causal_offset=None, cache=cache)
            if record:
                self._keep(depth, i, nodes, cache["self_attn"])
        return dec.project(x)

    def _keep(self, depth: int, layer: int, nodes: list[int], cache: dict) -> None:
        """Store the keys/values of the nodes that have children (their descendants attend to them)."""
        tree = self.tree
        keep = [(j, tree.store_row[n]) for j, n in enumerate(nodes) if n in tree.store_row]
        if not keep:
            return
        c = len(nodes)
        k, v = cache["k"][:, :, -c:], cache["v"][:, :, -c:]
        if self.store[depth][layer] is None:
            shape = (k.shape[0], k.shape[1], tree.store_size[depth], k.shape[3])
            self.store[depth][layer] = (k.new_zeros(shape), v.new_zeros(shape))
        src = torch.tensor([j for j, _ in keep], device=self.device)
        dst = torch.tensor([r for _, r in keep], device=self.device)
        self.store[depth][layer][0][:, :, dst] = k[:, :, src]
        self.store[depth][layer][1][:, :, dst] = v[:, :, src]

    def _score_edges(self, logits: torch.Tensor, nodes: list[int]) -> None:
        """Log-probabilities of the edges leaving `nodes`, from their outputs `logits` (B, c, V): the logit minus
        the logsumexp over the node's allowed tokens (the whole vocabulary when unconstrained), i.e. the naive
        path's log-softmax of the masked logits, computed on the allowed logits only."""
        rows, toks, ids = [], [], []
        for j, n in enumerate(nodes):
            for edge, tok in self.tree.edges.get(n, []):
                rows.append(j)
                toks.append(tok)
                ids.append(edge)
        r = torch.tensor(rows, device=self.device)
        t = torch.tensor(toks, device=self.device)
        picked = logits[:, r, t].float()
        if self.trie is None:
            lp = picked - torch.logsumexp(logits.float(), dim=-1)[:, r]
        else:
            allowed = [self.trie.get_next_layer([self.bos, *self.tree.prefixes[n]]) for n in nodes]
            index = torch.zeros(len(nodes), max(len(a) for a in allowed), dtype=torch.long)
            valid = torch.zeros(index.shape, dtype=torch.bool)
            for j, a in enumerate(allowed):
                index[j, :len(a)] = torch.tensor(a, dtype=torch.long)
                valid[j, :len(a)] = True
            index, valid = index.to(self.device), valid.to(self.device)
            kept = logits.gather(2, index[None].expand(logits.shape[0], -1, -1)).float()
            lse = torch.logsumexp(kept.masked_fill(~valid, float("-inf")), dim=-1)
            sets = [set(a) for a in allowed]
            inside = torch.tensor([tok in sets[j] for j, tok in zip(rows, toks)], dtype=torch.bool,
                                  device=self.device)
            lp = (picked - lse[:, r]).masked_fill(~inside, float("-inf"))
        self.edge_lp[:, torch.tensor(ids, device=self.device)] = lp

    def scores(self) -> torch.Tensor:
        """(B, C): each candidate's summed log-probabilities."""
        return self.edge_lp[:, self.tree.paths.to(self.device)].sum(dim=-1)


def score_tree(decoder, encoder_out, prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
               constraint_trie: Trie | None, *, bos: int, eos: int, pad: int, rows_per_pass: int = 4096,
               lockstep: Lockstep | None = None) -> torch.Tensor:
    """(B, C) candidate scores (module docstring); `constraint_trie` None = unconstrained log-softmax."""
    tree = CandidateTree([list(map(int, c)) for c in candidates], eos)
    scorer = _TreeScorer(decoder, encoder_out, [list(map(int, p)) for p in prompts], tree, constraint_trie,
                         bos, pad)
    run_in_lockstep(scorer.passes(rows_per_pass), scorer.idle, lockstep)
    return scorer.scores().cpu()
