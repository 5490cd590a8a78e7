"""Factual recall and editing (book chapter 11), one submodule per idea.

- :mod:`interpbook.factual.facts`: subject-relation-object facts built offline from the
  book's data wheels, and the filter that keeps the ones the model knows;
- :mod:`interpbook.factual.causal_tracing`: corrupt the subject with noise, restore hidden
  states or MLP/attention outputs by layer and position (Meng et al. 2022);
- :mod:`interpbook.factual.knockout`: block attention edges into the last position over
  layer windows, and decode what the subject position carries (Geva et al. 2023);
- :mod:`interpbook.factual.rome`: rank-one model editing of an MLP down-projection;
- :mod:`interpbook.factual.counterfact`: CounterFact-style edit evaluation (efficacy,
  paraphrase, specificity, fluency).

Import the submodule you need (``from interpbook.factual import rome``).
"""
