"""llama-cpp-python's ``llama_cpp.llama_grammar``: nexabind's grammars."""

from nexabind.grammar import LlamaGrammar, json_schema_to_grammar

__all__ = ["LlamaGrammar", "json_schema_to_grammar"]
