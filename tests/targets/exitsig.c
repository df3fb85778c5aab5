/*
 * exitsig: a child made by clone() with another exit signal than SIGCHLD
 * (SIGUSR2), which procsnap refuses by name.
 *
 *   ./exitsig default     READY, then waits for SIGUSR1; PASS after it
 */
#include "target.h"
#include <sys/syscall.h>
#include <sys/wait.h>

int main(int argc, char **argv)
{
	const char *mode = argc >= 2 ? argv[1] : NULL;
	if (!mode || strcmp(mode, "default"))
		ps_bad_mode(mode);
	ps_install_usr1();
	signal(SIGUSR2, SIG_IGN);
	long child = syscall(SYS_clone, (long)SIGUSR2, 0L, 0L, 0L, 0L);  /* a fork, exit signal SIGUSR2 */
	ps_setup(child >= 0, "clone");
	if (child == 0) {
		for (;;)
			pause();
	}
	ps_ready();
	ps_wait_usr1();
	kill((pid_t)child, SIGKILL);
	ps_setup(waitpid((pid_t)child, NULL, __WALL) == child, "reap the child");
	return ps_finish();
}
