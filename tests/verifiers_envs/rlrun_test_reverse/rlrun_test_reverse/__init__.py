from rlrun_test_reverse.taskset import ReverseTaskset

__all__ = ["ReverseTaskset"]
