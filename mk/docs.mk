# mk/docs.mk: the README's commands, run as written.
#
#   make test-readme   scripts/readme-test: every README block marked
#                      <!-- readme-test --> (the demo curl against
#                      `make serve`, `llmproxy check` and `hook`, the nginx
#                      example, the C and Go examples), with bounded
#                      timeouts; stops everything it started. Also: no
#                      citation of files outside the repository.

TEST_TARGETS += test-readme

.PHONY: test-readme

test-readme:
	scripts/readme-test
