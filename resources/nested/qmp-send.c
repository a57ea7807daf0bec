/*
 * qmp-send: a tiny QMP client for the nested harness's L1, which has only
 * busybox (built -static by build-initramfs.sh, /bin/qmp-send in L1).
 *
 *   qmp-send SOCKET ARG...
 *
 * Connects to the unix socket SOCKET, reads the greeting, negotiates with
 * qmp_capabilities, then for each ARG in order:
 *   a JSON command, e.g. '{"execute":"stop"}'
 *       sends it and reads until its reply;
 *   wait:EVENT
 *       reads until an event named EVENT arrives.
 * Every line read (greeting, replies, events) is printed to stdout as it
 * is; an event that arrived while a command waited for its reply counts
 * for a later wait:. The exit code is 0 if every command was answered with "return", 1
 * if one got "error", 2 on a connection or protocol failure, and 3 if
 * $QMP_SEND_TIMEOUT seconds (default 60) pass first.
 *
 * Replies and events are told apart by their first member: blkvm writes
 * members in sorted order, so an event starts with "data" or "event" and
 * a reply with "error", "id" or "return".
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static FILE *in;
static int fd;
/* Events that arrived while a command waited for its reply, for wait:. */
static char *backlog[256];
static int backlog_len;

static void timed_out(int sig)
{
	(void)sig;
	static const char msg[] = "qmp-send: timed out\n";
	if (write(2, msg, sizeof(msg) - 1) < 0) {
		/* Nothing more to do. */
	}
	_exit(3);
}

/* Reads one line into *buf, prints it, and returns it (NULL at EOF). */
static char *next_line(char **buf, size_t *cap)
{
	ssize_t n = getline(buf, cap, in);
	if (n < 0)
		return NULL;
	while (n > 0 && ((*buf)[n - 1] == '\n' || (*buf)[n - 1] == '\r'))
		(*buf)[--n] = 0;
	printf("%s\n", *buf);
	fflush(stdout);
	return *buf;
}

static int is_event(const char *line)
{
	return !strncmp(line, "{\"data\":", 8) || !strncmp(line, "{\"event\":", 9);
}

static void send_line(const char *cmd)
{
	size_t len = strlen(cmd), off = 0;
	while (off < len) {
		ssize_t n = write(fd, cmd + off, len - off);
		if (n <= 0) {
			perror("qmp-send: write");
			exit(2);
		}
		off += (size_t)n;
	}
	if (write(fd, "\n", 1) != 1) {
		perror("qmp-send: write");
		exit(2);
	}
}

/* Sends cmd and reads until its reply: 0 for "return", 1 for "error". */
static int command(const char *cmd, char **buf, size_t *cap)
{
	send_line(cmd);
	for (;;) {
		char *line = next_line(buf, cap);
		if (!line) {
			fprintf(stderr, "qmp-send: connection closed before the reply to %s\n", cmd);
			exit(2);
		}
		if (is_event(line)) {
			if (backlog_len < (int)(sizeof(backlog) / sizeof(backlog[0])))
				backlog[backlog_len++] = strdup(line);
			continue;
		}
		return strstr(line, "\"return\":") && !strstr(line, "{\"error\":") ? 0 : 1;
	}
}

/* Reads until an event named name. */
static void wait_event(const char *name, char **buf, size_t *cap)
{
	char *want;
	if (asprintf(&want, "\"event\":\"%s\"", name) < 0)
		exit(2);
	for (int i = 0; i < backlog_len; i++) {
		if (backlog[i] && strstr(backlog[i], want)) {
			free(backlog[i]);
			backlog[i] = NULL;
			free(want);
			return;
		}
	}
	for (;;) {
		char *line = next_line(buf, cap);
		if (!line) {
			fprintf(stderr, "qmp-send: connection closed before event %s\n", name);
			exit(2);
		}
		if (is_event(line) && strstr(line, want))
			break;
	}
	free(want);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: qmp-send SOCKET [JSON-COMMAND | wait:EVENT]...\n");
		return 2;
	}
	const char *t = getenv("QMP_SEND_TIMEOUT");
	signal(SIGALRM, timed_out);
	alarm(t ? (unsigned)atoi(t) : 60);

	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	if (strlen(argv[1]) >= sizeof(addr.sun_path)) {
		fprintf(stderr, "qmp-send: socket path too long\n");
		return 2;
	}
	strcpy(addr.sun_path, argv[1]);
	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		perror("qmp-send: connect");
		return 2;
	}
	in = fdopen(dup(fd), "r");
	if (!in) {
		perror("qmp-send: fdopen");
		return 2;
	}
	char *buf = NULL;
	size_t cap = 0;
	char *greeting = next_line(&buf, &cap);
	if (!greeting || !strstr(greeting, "\"QMP\"")) {
		fprintf(stderr, "qmp-send: no QMP greeting\n");
		return 2;
	}
	int rc = command("{\"execute\":\"qmp_capabilities\"}", &buf, &cap);
	if (rc)
		return 2;
	for (int i = 2; i < argc; i++) {
		if (!strncmp(argv[i], "wait:", 5))
			wait_event(argv[i] + 5, &buf, &cap);
		else if (command(argv[i], &buf, &cap))
			rc = 1;
	}
	free(buf);
	return rc;
}
