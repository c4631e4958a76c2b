package api

import (
	corev1 "k8s.io/api/core/v1"
	"k8s.io/utils/ptr"
)

// Container is the part of a worker container every pod that runs one
// shares: `vimg worker <subcommand>`, the pod's own name and namespace
// (where progress goes), the outcome in the termination message, and no
// privileges: no escalation, no capabilities, a read-only root. Callers add
// their volumes, mounts and environment.
func Container(name, image string, pull corev1.PullPolicy, subcommand string, res corev1.ResourceRequirements) corev1.Container {
	return corev1.Container{
		Name:            name,
		Image:           image,
		ImagePullPolicy: pull,
		Command:         []string{"/usr/bin/vimg", "worker", subcommand},
		Env: []corev1.EnvVar{
			{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
			{Name: "POD_NAMESPACE", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}},
		},
		Resources:                res,
		TerminationMessagePath:   TerminationMessagePath,
		TerminationMessagePolicy: corev1.TerminationMessageReadFile,
		SecurityContext: &corev1.SecurityContext{
			AllowPrivilegeEscalation: ptr.To(false),
			ReadOnlyRootFilesystem:   ptr.To(true),
			Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		},
	}
}
