/* Sets the CPUs of the OpenMP threads that serve the calling thread's parallel
 * regions: the team that runs its torch operators (same libgomp as torch: the
 * library is loaded after torch, so the soname resolves to torch's copy).
 * libgomp keeps a team's threads in a pool and hands thread i the same slot in
 * every region of the same size, so an affinity set here holds for the operators. */
#define _GNU_SOURCE
#include <omp.h>
#include <sched.h>

/* pin != 0: thread i of an `nthreads` team runs on cpus[i % ncpus] only;
 * pin == 0: every thread may run on any of cpus[0..ncpus).
 * Returns how many threads could not be set (0 on success). */
int set_omp_thread_affinity(const int *cpus, int ncpus, int nthreads, int pin) {
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : failed)
    {
        cpu_set_t set;
        CPU_ZERO(&set);
        if (pin) {
            CPU_SET(cpus[omp_get_thread_num() % ncpus], &set);
        } else {
            for (int i = 0; i < ncpus; i++) CPU_SET(cpus[i], &set);
        }
        failed += sched_setaffinity(0, sizeof(set), &set) != 0;
    }
    return failed;
}

/* The CPU each thread of an `nthreads` team is on now, into cpus[thread]. */
void omp_thread_cpus(int *cpus, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    cpus[omp_get_thread_num()] = sched_getcpu();
}
