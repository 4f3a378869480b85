"""``python -m medadapt index|ask --config configs/rag.yaml``: build the RAG index, answer with it.

One YAML serves both commands (corpus, index, retrieval, model), parsed by jsonargparse over the same
dataclasses the code uses, so ``--help`` documents every key and ``--print_config`` shows a full file.
"""

from __future__ import annotations

import logging
from typing import Optional

from medadapt.model_config import LoraConfig, ModelConfig
from medadapt.rag.config import IndexConfig, RetrievalConfig
from medadapt.rag.corpus import CorpusConfig

log = logging.getLogger(__name__)

ASK_TEMPLATE = ("{context}Answer the medical question below. Use the context where it helps and say so if "
                "it does not contain the answer.\n\nQuestion: {question}")


def build_parser(command: str):
    from medadapt.console import command_parser

    p = command_parser(command, __doc__, "a YAML file with the keys below (configs/rag.yaml)")
    p.add_class_arguments(CorpusConfig, "corpus", help="The corpus to index.")
    p.add_class_arguments(IndexConfig, "index", help="The index: where, which store, which embedder.")
    p.add_class_arguments(RetrievalConfig, "retrieval", help="Hybrid retrieval (BM25 + dense, RRF).")
    p.add_class_arguments(ModelConfig, "model", help="ask: the answering model (the project's loader).")
    p.add_argument("--lora", type=Optional[LoraConfig], default=None,
                   help="ask: LoRA shape of --ckpt_path (as in the fit config)")
    p.add_argument("--init_adapter", type=Optional[str], default=None, help="ask: an exported PEFT adapter folder")
    p.add_argument("--ckpt_path", type=Optional[str], default=None, help="ask: a LoRA checkpoint of a fit run")
    p.add_argument("--max_context_tokens", type=int, default=1024, help="ask: token budget of the snippets")
    p.add_argument("--max_new_tokens", type=int, default=1024, help="ask: generation budget (thinking included)")
    p.add_argument("--pipeline_yaml", type=Optional[str], default=None,
                   help="also write the retrieval pipeline (Haystack YAML) here")
    if command == "index":
        p.add_argument("--rebuild", type=bool, default=False,
                       help="empty the index and embed the whole corpus again (e.g. after it was reported corrupt)")
    if command == "ask":
        p.add_argument("question", type=str, help="the question to answer")
    return p


def index_main(argv: list[str]) -> None:
    from medadapt.rag.pipelines import build_index, retrieval_pipeline, save_pipeline

    parser = build_parser("index")
    cfg = parser.parse_args(argv)
    init = parser.instantiate_classes(cfg)
    stats = build_index(init.corpus, init.index, rebuild=cfg.rebuild)
    print(f"index {init.index.dir}: {stats['embedded']} documents embedded, {stats['already_indexed']} already "
          f"there" + (f", {stats['docs_per_s']:.1f} docs/s" if stats["docs_per_s"] else ""))
    if cfg.pipeline_yaml:
        print("retrieval pipeline:", save_pipeline(retrieval_pipeline(init.index, init.retrieval), cfg.pipeline_yaml))


def ask_main(argv: list[str]) -> None:
    parser = build_parser("ask")
    init = parser.instantiate_classes(parser.parse_args(argv))  # --help and a bad option answer before the imports

    import torch

    from medadapt.module import load_for_inference
    from medadapt.rag.context import format_context, snippet_text
    from medadapt.rag.pipelines import HybridRetriever

    docs = HybridRetriever(init.index, init.retrieval).retrieve(init.question)
    module = load_for_inference(init.model, init.lora, init.init_adapter, init.ckpt_path)
    tok, model = module.tokenizer, module.model
    context, used = format_context([snippet_text(d) for d in docs], tok, init.max_context_tokens)
    message = ASK_TEMPLATE.format(context=context, question=init.question.strip())
    ids = tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(**{k: v.to(device) for k, v in ids.items()}, max_new_tokens=init.max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(answer)
    print("\nSources:")
    for i, d in enumerate(docs[:used]):
        title = (d.meta or {}).get("title", "")
        print(f"  [{i + 1}] {d.id}  {title}  (score {d.score:.3f})")

