"""Full-history object import (issue 14): a declarative table of streams read by one executor,
stages of jobs advanced by a waiter, on SAQ over Redis or an in-process dispatcher."""
