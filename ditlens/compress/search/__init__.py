"""Plan search: DiTFastAttn V1 greedy, DiTFastAttnV2 head-wise integer programs (online or from a
trace), budget mode. Every search returns a :class:`~ditlens.compress.plan.Plan` in the runtime's schema."""

from ditlens.compress.search.api import search
from ditlens.compress.search.cli import register_search
from ditlens.compress.search.common import SearchResult, default_candidates, parse_candidate_list
from ditlens.compress.search.engine import EngineConfig
from ditlens.compress.search.greedy import GreedyConfig, search_greedy
from ditlens.compress.search.headwise import HeadwiseConfig, search_headwise
from ditlens.compress.search.milp import solve_layer

__all__ = ["search", "register_search", "EngineConfig", "GreedyConfig", "search_greedy", "HeadwiseConfig", "SearchResult", "default_candidates", "parse_candidate_list",
           "search_headwise", "solve_layer"]
