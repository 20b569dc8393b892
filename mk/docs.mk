# mk/docs.mk: the README's commands, run as written.
#
#   make test-readme   scripts/readme-test: every README block marked
#                      <!-- readme-test --> (the demo curl against
#                      `make serve`, `llmproxy check` and `hook`, the nginx
#                      example, the C and Go examples), with bounded
#                      timeouts; stops everything it started. Also: no
#                      citation of files outside the repository.
#   make test-readme-clone  the same on a fresh `git clone` of HEAD

TEST_TARGETS += test-readme

.PHONY: test-readme test-readme-clone

test-readme:
	scripts/readme-test

# The same on a fresh clone of HEAD (builds everything from scratch).
test-readme-clone:
	scripts/readme-test --clone
