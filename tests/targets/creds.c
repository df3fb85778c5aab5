/*
 * creds: credentials across a checkpoint (started as root).
 *
 *   ./creds default
 *
 * It becomes uid 1000/1000/1000 (fs 1000),
 * gids 1001/1002/1003, groups {5, 6, 7}; keeps CAP_KILL and
 * CAP_NET_BIND_SERVICE permitted and effective, CAP_NET_BIND_SERVICE also
 * inheritable and ambient; drops CAP_SYS_ADMIN from the bounding set; sets
 * SECBIT_NOROOT | SECBIT_KEEP_CAPS and no_new_privs, then starts a second
 * thread (which inherits all of it). After SIGUSR1 both threads read them all
 * back. Sabotage: the ambient capability is lowered after READY.
 */
#include "target.h"
#include <grp.h>
#include <linux/capability.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#define CAP_BIT(c) (1ull << (c))
static const unsigned long long WANT_PRM = CAP_BIT(CAP_KILL) | CAP_BIT(CAP_NET_BIND_SERVICE);
static const unsigned long long WANT_INH = CAP_BIT(CAP_NET_BIND_SERVICE);
#define SECBITS (1 << 0 | 1 << 4) /* SECBIT_NOROOT | SECBIT_KEEP_CAPS: caps kept through setresuid */

static unsigned long long caps(int which)
{
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct d[2];
	if (syscall(SYS_capget, &h, d))
		return ~0ull;
	if (which == 0)
		return d[0].effective | (unsigned long long)d[1].effective << 32;
	if (which == 1)
		return d[0].permitted | (unsigned long long)d[1].permitted << 32;
	return d[0].inheritable | (unsigned long long)d[1].inheritable << 32;
}

static void check(const char *who)
{
	char what[64];
	uid_t r, e, s;
	gid_t gr, ge, gs;
	getresuid(&r, &e, &s);
	getresgid(&gr, &ge, &gs);
	snprintf(what, sizeof(what), "%s uids", who);
	PS_CHECK_U64(what, 1000 * 1000000ull + 1000 * 1000 + 1000, r * 1000000ull + e * 1000 + s);
	snprintf(what, sizeof(what), "%s gids", who);
	PS_CHECK_U64(what, 1001 * 1000000ull + 1002 * 1000 + 1003, gr * 1000000ull + ge * 1000 + gs);
	gid_t groups[16];
	int n = getgroups(16, groups);
	snprintf(what, sizeof(what), "%s groups", who);
	PS_CHECK_U64(what, 0x050607, n == 3 ? groups[0] << 16 | groups[1] << 8 | groups[2] : (unsigned)n);
	snprintf(what, sizeof(what), "%s effective caps", who);
	PS_CHECK_U64(what, WANT_PRM, caps(0));
	snprintf(what, sizeof(what), "%s permitted caps", who);
	PS_CHECK_U64(what, WANT_PRM, caps(1));
	snprintf(what, sizeof(what), "%s inheritable caps", who);
	PS_CHECK_U64(what, WANT_INH, caps(2));
	snprintf(what, sizeof(what), "%s ambient CAP_NET_BIND_SERVICE", who);
	PS_CHECK_U64(what, 1, prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, CAP_NET_BIND_SERVICE, 0, 0));
	snprintf(what, sizeof(what), "%s bounding CAP_SYS_ADMIN", who);
	PS_CHECK_U64(what, 0, prctl(PR_CAPBSET_READ, CAP_SYS_ADMIN, 0, 0, 0));
	snprintf(what, sizeof(what), "%s bounding CAP_KILL", who);
	PS_CHECK_U64(what, 1, prctl(PR_CAPBSET_READ, CAP_KILL, 0, 0, 0));
	snprintf(what, sizeof(what), "%s securebits", who);
	PS_CHECK_U64(what, SECBITS, prctl(PR_GET_SECUREBITS, 0, 0, 0, 0));
	snprintf(what, sizeof(what), "%s no_new_privs", who);
	PS_CHECK_U64(what, 1, prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));
}

static volatile int checked, started;

static void *second(void *arg)
{
	(void)arg;
	started = 1;  /* past glibc's start_thread, which runs with every signal blocked */
	while (!ps_usr1)
		usleep(1000);
	check("thread");
	checked = 1;
	return NULL;
}

int main(int argc, char **argv)
{
	const char *mode = argc >= 2 ? argv[1] : NULL;
	if (!mode || strcmp(mode, "default"))
		ps_bad_mode(mode);
	ps_install_usr1();
	/* all of it before the second thread exists, which inherits it: the
	 * capability calls and prctls act on the calling thread only */
	gid_t groups[] = { 5, 6, 7 };
	ps_setup(setgroups(3, groups) == 0, "setgroups");
	ps_setup(prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN, 0, 0, 0) == 0, "drop CAP_SYS_ADMIN from bounding");
	ps_setup(prctl(PR_SET_SECUREBITS, SECBITS, 0, 0, 0) == 0, "securebits");
	ps_setup(setresgid(1001, 1002, 1003) == 0, "setresgid");
	ps_setup(setresuid(1000, 1000, 1000) == 0, "setresuid");
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct d[2] = { { (unsigned)WANT_PRM, (unsigned)WANT_PRM, (unsigned)WANT_INH } };
	ps_setup(syscall(SYS_capset, &h, d) == 0, "capset");
	ps_setup(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE, 0, 0) == 0, "ambient raise");
	ps_setup(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, "no_new_privs");
	pthread_t th;
	ps_setup(pthread_create(&th, NULL, second, NULL) == 0, "pthread_create");
	while (!started)  /* else the state before the dump may catch its mask mid-start */
		usleep(1000);
	ps_ready();
	if (ps_sabotage())
		prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_LOWER, CAP_NET_BIND_SERVICE, 0, 0);
	ps_wait_usr1();
	check("main");
	pthread_join(th, NULL);
	PS_CHECK_U64("thread checked", 1, checked);
	return ps_finish();
}
