/*
 * ipcns: the objects of a container's IPC namespace, made by its init
 * (`unshare --fork --pid --ipc ./ipcns MODE`).
 *
 *   ./ipcns objects  Q: a SysV message queue (key 0x15a1, mode 0640,
 *                    owner uid 1001 gid 1002 by IPC_SET, qbytes 4000),
 *                    made after a queue made and removed (so its id is
 *                    not the first), holding 4 messages: type 5 "first",
 *                    type 2 "second", type 5 "" (empty), type 7, 300
 *                    pattern bytes;
 *                    Q2: a queue made with euid 1000 egid 1000 (its
 *                    creator), empty; S: a semaphore set of 3 (key 0x15a2,
 *                    mode 0660) at 7, 0, 32767; M: a segment no process
 *                    attaches (key 0x15a3, 8192 bytes, mode 0604) filled
 *                    with a pattern; P: POSIX queue /psq (maxmsg 5,
 *                    msgsize 64, mode 0640) with "a" prio 1, "b" prio 9,
 *                    "c" prio 1; fd 20 of /psq O_RDONLY|O_NONBLOCK, fd 21
 *                    of /psq O_WRONLY.
 *                    After SIGUSR1: every id by its key is the one it was,
 *                    IPC_STAT's mode, owner, creator, qbytes, qnum; the
 *                    messages received in order (types, bytes); the
 *                    semaphore values; M's bytes; /psq's attributes, mode,
 *                    its messages from fd 20 (b, a, c), then EAGAIN (fd 20
 *                    is non-blocking), fd 21 sends.
 *   ./ipcns notify   /psq with an mq_notify registration (SIGEV_SIGNAL).
 *   ./ipcns undo     a semaphore set, semop +1 with SEM_UNDO.
 * Sabotage, right after READY: one message of Q is received.
 */
#include "target.h"
#include <fcntl.h>
#include <mqueue.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/stat.h>

#define KEY_Q 0x15a1
#define KEY_Q2 0x15a4
#define KEY_S 0x15a2
#define KEY_M 0x15a3
#define M_LEN 8192
#define LONG_LEN 300

struct msg { long type; char text[512]; };

static const struct { long type; const char *text; } MSGS[] = {{5, "first"}, {2, "second"}, {5, ""}};

static void fill(unsigned char *p, size_t n, int seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (unsigned char)(i * 13 + seed);
}

static void send(int q, long type, const void *data, size_t n)
{
	struct msg m = {type, {0}};
	memcpy(m.text, data, n);
	ps_setup(msgsnd(q, &m, n, IPC_NOWAIT) == 0, "msgsnd");
}

static void check_perm(const char *what, struct ipc_perm *p, unsigned mode, unsigned uid, unsigned gid,
		       unsigned cuid, unsigned cgid)
{
	const struct { const char *name; unsigned expected, found; } field[] = {
		{"mode", mode, p->mode & 0777}, {"uid", uid, p->uid}, {"gid", gid, p->gid},
		{"cuid", cuid, p->cuid}, {"cgid", cgid, p->cgid},
	};
	for (unsigned i = 0; i < sizeof(field) / sizeof(field[0]); i++) {
		char w[64];
		snprintf(w, sizeof(w), "%s: %s", what, field[i].name);
		PS_CHECK_U64(w, field[i].expected, field[i].found);
	}
}

static int objects(void)
{
	int gone = msgget(IPC_PRIVATE, IPC_CREAT | 0600);
	ps_setup(gone >= 0 && msgctl(gone, IPC_RMID, NULL) == 0, "a queue made and removed");
	int q = msgget(KEY_Q, IPC_CREAT | IPC_EXCL | 0640);
	ps_setup(q >= 0, "msgget Q");
	struct msqid_ds ds;
	ps_setup(msgctl(q, IPC_STAT, &ds) == 0, "IPC_STAT Q");
	ds.msg_perm.uid = 1001;
	ds.msg_perm.gid = 1002;
	ds.msg_qbytes = 4000;
	ps_setup(msgctl(q, IPC_SET, &ds) == 0, "IPC_SET Q");
	for (unsigned i = 0; i < 3; i++)
		send(q, MSGS[i].type, MSGS[i].text, strlen(MSGS[i].text));
	unsigned char longer[LONG_LEN];
	fill(longer, LONG_LEN, 1);
	send(q, 7, longer, LONG_LEN);
	ps_setup(setegid(1000) == 0 && seteuid(1000) == 0, "seteuid 1000");
	int q2 = msgget(KEY_Q2, IPC_CREAT | IPC_EXCL | 0600);
	ps_setup(q2 >= 0, "msgget Q2 as uid 1000");
	ps_setup(seteuid(0) == 0 && setegid(0) == 0, "seteuid 0");

	int s = semget(KEY_S, 3, IPC_CREAT | IPC_EXCL | 0660);
	ps_setup(s >= 0, "semget");
	unsigned short vals[3] = {7, 0, 32767};
	ps_setup(semctl(s, 0, SETALL, vals) == 0, "SETALL");

	int m = shmget(KEY_M, M_LEN, IPC_CREAT | IPC_EXCL | 0604);
	ps_setup(m >= 0, "shmget");
	unsigned char *seg = shmat(m, NULL, 0);
	ps_setup(seg != (void *)-1, "shmat");
	fill(seg, M_LEN, 5);
	uint64_t seg_hash = ps_hash(seg, M_LEN);
	ps_setup(shmdt(seg) == 0, "shmdt");

	struct mq_attr attr = {0, 5, 64, 0, {0}};
	mode_t old = umask(0);
	mqd_t p = mq_open("/psq", O_RDWR | O_CREAT | O_EXCL, 0640, &attr);
	umask(old);
	ps_setup(p >= 0, "mq_open /psq");
	ps_setup(mq_send(p, "a", 1, 1) == 0 && mq_send(p, "b", 1, 9) == 0 && mq_send(p, "c", 1, 1) == 0, "mq_send");
	close(p);
	mqd_t rd = mq_open("/psq", O_RDONLY | O_NONBLOCK), wr = mq_open("/psq", O_WRONLY);
	ps_setup(dup2(rd, 20) == 20 && dup2(wr, 21) == 21, "fds 20 and 21");
	close(rd);
	close(wr);

	ps_ready();
	if (ps_sabotage()) {
		struct msg got;
		msgrcv(q, &got, sizeof(got.text), 0, IPC_NOWAIT);
	}
	ps_wait_usr1();

	PS_CHECK_U64("Q: id by its key", q, msgget(KEY_Q, 0));
	PS_CHECK_U64("Q2: id by its key", q2, msgget(KEY_Q2, 0));
	PS_CHECK_U64("S: id by its key", s, semget(KEY_S, 0, 0));
	PS_CHECK_U64("M: id by its key", m, shmget(KEY_M, 0, 0));
	memset(&ds, 0, sizeof(ds));
	ps_setup(msgctl(q, IPC_STAT, &ds) == 0, "IPC_STAT Q after");
	check_perm("Q", &ds.msg_perm, 0640, 1001, 1002, 0, 0);
	PS_CHECK_U64("Q: qbytes", 4000, ds.msg_qbytes);
	PS_CHECK_U64("Q: qnum", 4, ds.msg_qnum);
	for (unsigned i = 0; i < 4; i++) {
		struct msg got;
		ssize_t n = msgrcv(q, &got, sizeof(got.text), 0, IPC_NOWAIT);
		long type = i < 3 ? MSGS[i].type : 7;
		size_t len = i < 3 ? strlen(MSGS[i].text) : LONG_LEN;
		const void *text = i < 3 ? (const void *)MSGS[i].text : longer;
		PS_CHECK_U64("Q: a message's length", len, n);
		PS_CHECK_U64("Q: a message's type", type, got.type);
		PS_CHECK_U64("Q: a message's bytes", 0, n >= 0 ? memcmp(got.text, text, len) : -1);
	}
	ps_setup(msgctl(q2, IPC_STAT, &ds) == 0, "IPC_STAT Q2 after");
	check_perm("Q2", &ds.msg_perm, 0600, 1000, 1000, 1000, 1000);
	struct semid_ds sds;
	ps_setup(semctl(s, 0, IPC_STAT, &sds) == 0, "IPC_STAT S");
	check_perm("S", &sds.sem_perm, 0660, 0, 0, 0, 0);
	unsigned short now[3] = {1, 1, 1};
	ps_setup(semctl(s, 0, GETALL, now) == 0, "GETALL");
	PS_CHECK_U64("S: value 0", 7, now[0]);
	PS_CHECK_U64("S: value 1", 0, now[1]);
	PS_CHECK_U64("S: value 2", 32767, now[2]);
	struct shmid_ds mds;
	ps_setup(shmctl(m, IPC_STAT, &mds) == 0, "IPC_STAT M");
	check_perm("M", &mds.shm_perm, 0604, 0, 0, 0, 0);
	PS_CHECK_U64("M: size", M_LEN, mds.shm_segsz);
	PS_CHECK_U64("M: attached by none", 0, mds.shm_nattch);
	seg = shmat(m, NULL, SHM_RDONLY);
	ps_setup(seg != (void *)-1, "shmat after");
	PS_CHECK_U64("M: bytes", seg_hash, ps_hash(seg, M_LEN));

	PS_CHECK_U64("fd 20: O_NONBLOCK", O_NONBLOCK, fcntl(20, F_GETFL) & (O_NONBLOCK | O_ACCMODE));
	PS_CHECK_U64("fd 21: O_WRONLY", O_WRONLY, fcntl(21, F_GETFL) & (O_NONBLOCK | O_ACCMODE));
	ps_setup(mq_getattr(20, &attr) == 0, "mq_getattr");
	PS_CHECK_U64("/psq: maxmsg", 5, attr.mq_maxmsg);
	PS_CHECK_U64("/psq: msgsize", 64, attr.mq_msgsize);
	PS_CHECK_U64("/psq: curmsgs", 3, attr.mq_curmsgs);
	struct stat st;
	ps_setup(fstat(20, &st) == 0, "fstat 20");
	PS_CHECK_U64("/psq: mode", 0640, st.st_mode & 0777);
	const char *order = "bac";
	const unsigned prios[3] = {9, 1, 1};
	for (int i = 0; i < 3; i++) {
		char buf[64] = {0};
		unsigned prio = 0;
		ssize_t n = mq_receive(20, buf, sizeof(buf), &prio);
		PS_CHECK_U64("/psq: a message's length", 1, n);
		PS_CHECK_U64("/psq: a message's byte", order[i], buf[0]);
		PS_CHECK_U64("/psq: a message's priority", prios[i], prio);
	}
	char buf[64];
	PS_CHECK_U64("/psq: empty, non-blocking", EAGAIN, mq_receive(20, buf, sizeof(buf), NULL) < 0 ? errno : 0);
	PS_CHECK_U64("fd 21: sends", 0, mq_send(21, "d", 1, 0));
	return ps_finish();
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : NULL;
	ps_install_usr1();
	if (mode && !strcmp(mode, "objects"))
		return objects();
	if (mode && !strcmp(mode, "notify")) {
		struct mq_attr attr = {0, 5, 64, 0, {0}};
		mqd_t p = mq_open("/psq", O_RDWR | O_CREAT, 0600, &attr);
		struct sigevent ev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGUSR2};
		signal(SIGUSR2, SIG_IGN);
		ps_setup(p >= 0 && mq_notify(p, &ev) == 0, "mq_notify");
	} else if (mode && !strcmp(mode, "undo")) {
		int s = semget(KEY_S, 1, IPC_CREAT | 0600);
		struct sembuf op = {0, 1, SEM_UNDO};
		ps_setup(s >= 0 && semop(s, &op, 1) == 0, "semop SEM_UNDO");
	} else {
		ps_bad_mode(mode);
	}
	ps_ready();
	ps_wait_usr1();
	return ps_finish();
}
