/*
 * inotify: one instance with several watches that must come back with their
 * watch descriptors and masks, and deliver their events after a restore.
 *
 *   ./inotify default DIR
 *
 * In DIR: files a, b, c and directory sub. Watches, in this order:
 *   wd 1  a    IN_MODIFY | IN_ATTRIB          (a is then renamed to a2)
 *   wd 2  DIR  IN_CREATE | IN_DELETE | IN_MOVED_TO
 *   wd 3  b    IN_OPEN | IN_ONESHOT
 *   wd 4  c    removed again: a gap
 *   wd 5  sub  IN_CREATE, then IN_DELETE added with IN_MASK_ADD
 * Every event of the set-up is read before READY. After SIGUSR1: adding each
 * watch again (IN_MASK_ADD, its own bits) must give back its wd (the inode
 * is watched under the same wd); then writes to a2, creates DIR/new, opens b
 * (twice: one-shot), creates and removes sub/x, and reads exactly
 *   1 IN_MODIFY, 2 IN_CREATE "new", 3 IN_OPEN, 3 IN_IGNORED, 5 IN_CREATE "x",
 *   5 IN_DELETE "x"
 * and the next watch added (on c) gets wd 6.
 * Sabotage: watch 3 is removed after READY.
 */
#include "target.h"
#include <fcntl.h>
#include <poll.h>
#include <sys/inotify.h>
#include <sys/stat.h>

static char dir[512];
static int ifd;

static const char *at(const char *name)
{
	static char buf[4][600];
	static int n;
	char *b = buf[n++ % 4];
	snprintf(b, 600, "%s/%s", dir, name);
	return b;
}

static void touch(const char *name)
{
	int fd = open(at(name), O_CREAT | O_WRONLY | O_TRUNC, 0644);
	ps_setup(fd >= 0, name);
	close(fd);
}

static void drain(void)
{
	char buf[4096];
	while (read(ifd, buf, sizeof(buf)) > 0)
		;
}

struct want { int wd; uint32_t mask; const char *name; };

int main(int argc, char **argv)
{
	if (argc < 3 || strcmp(argv[1], "default") != 0)
		ps_bad_mode(argc > 1 ? argv[1] : NULL);
	snprintf(dir, sizeof(dir), "%s", argv[2]);
	ps_install_usr1();
	touch("a");
	touch("b");
	touch("c");
	mkdir(at("sub"), 0755);
	ifd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
	ps_setup(ifd >= 0, "inotify_init1");
	int wd[6];
	wd[1] = inotify_add_watch(ifd, at("a"), IN_MODIFY | IN_ATTRIB);
	wd[2] = inotify_add_watch(ifd, dir, IN_CREATE | IN_DELETE | IN_MOVED_TO);
	wd[3] = inotify_add_watch(ifd, at("b"), IN_OPEN | IN_ONESHOT);
	wd[4] = inotify_add_watch(ifd, at("c"), IN_CLOSE_WRITE);
	ps_setup(inotify_rm_watch(ifd, wd[4]) == 0, "rm_watch");
	wd[5] = inotify_add_watch(ifd, at("sub"), IN_CREATE);
	ps_setup(inotify_add_watch(ifd, at("sub"), IN_DELETE | IN_MASK_ADD) == wd[5], "IN_MASK_ADD");
	for (int i = 1; i <= 5; i++)
		if (wd[i] != i) {
			dprintf(1, "SETUP ERROR: watch %d got wd %d\n", i, wd[i]);
			_exit(2);
		}
	ps_setup(rename(at("a"), at("a2")) == 0, "rename");
	drain();
	ps_ready();
	if (ps_sabotage())
		inotify_rm_watch(ifd, 3);
	ps_wait_usr1();
	drain();   /* sabotage's IN_IGNORED */

	struct { const char *name; uint32_t mask; int wd; } again[] = {
		{ "a2", IN_MODIFY | IN_ATTRIB, 1 }, { NULL, IN_CREATE, 2 }, { "b", IN_OPEN, 3 },
		{ "sub", IN_CREATE, 5 },
	};
	for (unsigned i = 0; i < sizeof(again) / sizeof(again[0]); i++) {
		int got = inotify_add_watch(ifd, again[i].name ? at(again[i].name) : dir, again[i].mask | IN_MASK_ADD);
		if (got != again[i].wd)
			ps_fail("watch again", "%s: expected wd %d found %d", again[i].name ? again[i].name : "DIR",
				again[i].wd, got);
	}
	int fd = open(at("a2"), O_WRONLY);
	ps_setup(fd >= 0 && write(fd, "x", 1) == 1, "write a2");
	close(fd);
	touch("new");
	for (int i = 0; i < 2; i++) {
		fd = open(at("b"), O_RDONLY);
		ps_setup(fd >= 0, "open b");
		close(fd);
	}
	touch("sub/x");
	ps_setup(unlink(at("sub/x")) == 0, "unlink sub/x");

	struct want want[] = {
		{ 1, IN_MODIFY, "" }, { 2, IN_CREATE, "new" }, { 3, IN_OPEN, "" }, { 3, IN_IGNORED, "" },
		{ 5, IN_CREATE, "x" }, { 5, IN_DELETE, "x" },
	};
	unsigned n = 0, nwant = sizeof(want) / sizeof(want[0]);
	char buf[4096] __attribute__((aligned(8)));
	struct pollfd p = { ifd, POLLIN, 0 };
	while (poll(&p, 1, 200) == 1) {
		ssize_t len = read(ifd, buf, sizeof(buf));
		if (len <= 0)
			break;
		for (char *q = buf; q < buf + len;) {
			struct inotify_event *e = (struct inotify_event *)q;
			const char *name = e->len ? e->name : "";
			if (n >= nwant)
				ps_fail("event", "unexpected wd %d mask %#x '%s'", e->wd, e->mask, name);
			else if (e->wd != want[n].wd || e->mask != want[n].mask || strcmp(name, want[n].name))
				ps_fail("event", "%u: expected wd %d mask %#x '%s' found wd %d mask %#x '%s'", n,
					want[n].wd, want[n].mask, want[n].name, e->wd, e->mask, name);
			n++;
			q += sizeof(*e) + e->len;
		}
	}
	if (n < nwant)
		ps_fail("events", "expected %u found %u", nwant, n);
	PS_CHECK_U64("next wd", 6, inotify_add_watch(ifd, at("c"), IN_CLOSE_WRITE));
	return ps_finish();
}
